"""One copy of a family's backbone in memory, however many of its P are loaded.

Every graph of a family bundle points into one shared data file (see datafile.py). Loaded as
usual, each ONNX Runtime session would read its own copy of those weights. Here the file is
memory-mapped once, each stored tensor becomes one OrtValue over the mapping, and every session
receives those values through SessionOptions.add_initializer, which ONNX Runtime uses in place
of the graph's own initializer of that name (names may differ between graphs; the bytes are
found by their offset in the shared file). Such sessions also run without a CPU memory arena,
so that idle ones do not each hold their peak activations. No torch: the runtime imports this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .bundle import SHARED_DATA_FILE
from .errors import BundleError

# Keep ONNX Runtime from repacking shared MatMul weights into a private copy per session.
NO_PREPACKING = "session.disable_prepacking"
# Without prepacking, MatMulNBits (accuracy level 4) takes another CPU path whose results differ
# from the validated one (measured: 4e-2 on logits of magnitude 4, int4): quantized graphs keep it.
NEEDS_PREPACKING = ("MatMulNBits",)


class SharedWeights:
    """The shared data file of one family bundle, mapped read-only, as OrtValues by location."""

    def __init__(self, bundle_dir: Path, prepacking: bool | None = None) -> None:
        self.path = Path(bundle_dir) / SHARED_DATA_FILE
        self.prepacking = prepacking
        if not self.path.is_file() or self.path.stat().st_size == 0:
            raise BundleError(f"{self.path}: the family's shared weights are missing")
        self.mapping = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.values: dict[tuple[int, int, int, tuple[int, ...]], ort.OrtValue] = {}

    def add_to(self, options: ort.SessionOptions, model_path: Path) -> int:
        """Hand every initializer of `model_path` that lives in the shared file to `options`;
        returns how many. Without prepacking, sessions run on the shared weights themselves; with
        it (forced, or left to None for a quantized graph) each packs its own copy of them."""
        proto = onnx.load(str(model_path), load_external_data=False)
        count = 0
        for tensor in proto.graph.initializer:
            info = {entry.key: entry.value for entry in tensor.external_data}
            if tensor.data_location != TensorProto.EXTERNAL or info.get("location") != SHARED_DATA_FILE:
                continue
            key = (int(info.get("offset", 0)), int(info["length"]), tensor.data_type, tuple(tensor.dims))
            if key not in self.values:
                self.values[key] = ort.OrtValue.ortvalue_from_numpy(self._array(*key))
            options.add_initializer(tensor.name, self.values[key])
            count += 1
        prepacking = self.prepacking
        if prepacking is None:
            prepacking = any(node.op_type in NEEDS_PREPACKING for node in proto.graph.node)
        if not prepacking:
            options.add_session_config_entry(NO_PREPACKING, "1")
        # Each session's CPU arena keeps its own high-water mark of activations; with several P
        # loaded together those add up (4 sessions, mid-size: 381 vs 335 MiB peak), and decode
        # speed did not change measurably without it.
        options.enable_cpu_mem_arena = False
        return count

    def _array(self, offset: int, length: int, data_type: int, dims: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
        if offset + length > len(self.mapping) or length != dtype.itemsize * int(np.prod(dims, dtype=np.int64)):
            raise BundleError(f"{self.path}: a stored tensor ({length} bytes at {offset}) does not fit the file")
        return self.mapping[offset : offset + length].view(dtype).reshape(dims)
