"""Where each weight of a bundle gets its bytes, and the writer that walks that table once.

`convert` traces the graph without weights (export.py). Every initializer that holds a weight is
then described by a recipe instead of data:
  Plain   checkpoint tensors stacked along their first axis (q/k/v, gate/up), cast to the export
          dtype, then permuted and reshaped as the graph wants (a Linear's weight transposed
          to MatMul's [in, out]; a prefix [P, KV, T, D] folded to [1, T, P*KV*D])
  Packed  such a stack, [N outputs, K inputs], packed into MatMulNBits blocks (intweights.pack):
          one recipe for the packed bytes, one for the scales
`write_data` walks the graph's initializers in order and writes each recipe into
model.onnx.data, CHUNK_BYTES of output at a time, so that a convert holds a slice of one weight
in memory, never the model: a transposed weight is read a band of rows at a time and each band
written where its columns go. Offsets are aligned to ALIGN bytes and follow from the sizes alone,
so two converts write the same bytes. Nothing here knows the model: only checkpoint names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from .bundle import DATA_FILE
from .checkpoint import Checkpoint
from .intweights import BLOCK_SIZE, blocks, pack

ALIGN = 64  # byte alignment of each tensor in the data file
CHUNK_BYTES = 16 << 20  # output bytes produced per step
# A recipe with any other permutation is computed whole: only small tensors (prefixes) have one.
WHOLE_LIMIT = 256 << 20
ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16}

Progress = Callable[[int, int], None]  # (bytes written, bytes in all)


@dataclass(frozen=True)
class Stack:
    """Checkpoint tensors `parts`, stacked along their first axis and cast to `dtype`."""

    parts: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(s[0] for s in self.shapes), *self.shapes[0][1:])

    def rows(self, checkpoint: Checkpoint, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the stack, read from the parts they fall in."""
        pieces, offset = [], 0
        for name, shape in zip(self.parts, self.shapes, strict=True):
            lo, hi = max(start, offset), min(stop, offset + shape[0])
            if lo < hi:
                pieces.append(checkpoint.read(name, self.dtype, lo - offset, hi - offset))
            offset += shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def bands(self, checkpoint: Checkpoint, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) in bands of at most `step` rows, none spanning two parts (no copy
        joins them)."""
        offset = 0
        for name, shape in zip(self.parts, self.shapes, strict=True):
            for start in range(0, shape[0], step):
                yield offset + start, checkpoint.read(name, self.dtype, start, min(shape[0], start + step))
            offset += shape[0]


@dataclass(frozen=True)
class Plain:
    """`stack`, permuted by `perm` (None: as stored), viewed as `shape`."""

    stack: Stack
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None

    @property
    def dtype(self) -> int:
        return ONNX_TYPES[self.stack.dtype]

    def transposed(self, perm: tuple[int, ...]) -> Plain:
        current = self.perm or tuple(range(len(self.stack.shape)))
        if self.shape != tuple(self.stack.shape[i] for i in current):  # reshaped already: permute a view of it
            raise ValueError("a reshaped recipe cannot be permuted")
        combined = tuple(current[i] for i in perm)
        return replace(self, perm=None if combined == tuple(sorted(combined)) else combined,
                       shape=tuple(self.shape[i] for i in perm))  # fmt: skip

    def reshaped(self, shape: tuple[int, ...]) -> Plain:
        return replace(self, shape=shape)

    def matrix(self) -> Stack | None:
        """The [N, K] stack whose rows are the outputs of MatMul by this [K, N] weight, if there is
        one (a Linear's weight transposed, as stored in the checkpoint)."""
        stored = self.stack.shape
        if self.perm == (1, 0) and len(stored) == 2 and self.shape == (stored[1], stored[0]):
            return self.stack
        return None


@dataclass(frozen=True)
class Packed:
    """`stack` [N, K] packed into `bits`-bit MatMulNBits blocks along K: `part` "packed" (uint8
    [N, K/32, 32*bits/8]) or "scales" ([N, K/32], in `stack`'s dtype)."""

    stack: Stack
    bits: int
    part: str

    @property
    def shape(self) -> tuple[int, ...]:
        n, k = self.stack.shape
        return (n, blocks(k), BLOCK_SIZE * self.bits // 8) if self.part == "packed" else (n, blocks(k))

    @property
    def dtype(self) -> int:
        return TensorProto.UINT8 if self.part == "packed" else ONNX_TYPES[self.stack.dtype]


Recipe = Plain | Packed


def placeholder(name: str, recipe: Recipe) -> TensorProto:
    """An initializer that will point into the data file once `write_data` has written it."""
    tensor = TensorProto(name=name, data_type=recipe.dtype, dims=recipe.shape)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def nbytes(recipe: Recipe) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(recipe.dtype)).itemsize
    return math.prod(recipe.shape) * itemsize


def write_data(
    graph: onnx.GraphProto,
    recipes: dict[str, Recipe],
    checkpoint: Checkpoint,
    path: Path,
    progress: Progress | None = None,
    chunk_bytes: int | None = None,
) -> None:
    """Write every initializer of `graph` that has a recipe into the data file at `path`, in graph
    order, and point the initializer at its bytes. `progress(done, total)` after each chunk."""
    chunk = chunk_bytes or CHUNK_BYTES
    tensors = [t for t in graph.initializer if t.name in recipes]
    total, done = sum(nbytes(recipes[t.name]) for t in tensors), 0
    pending_scales: dict[Stack, np.ndarray] = {}  # written with their packed weights, stored next
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        end = 0
        for tensor in tensors:
            recipe = recipes[tensor.name]
            offset = (end + ALIGN - 1) // ALIGN * ALIGN
            for written in _write(fd, offset, recipe, checkpoint, chunk, pending_scales):
                done += written
                if progress:
                    progress(done, total)
            end = offset + nbytes(recipe)
            _point(tensor, offset, end - offset)
        os.ftruncate(fd, end)  # a last transposed band may have been written before the file's end
    finally:
        os.close(fd)


def _write(
    fd: int, offset: int, recipe: Recipe, checkpoint: Checkpoint, chunk: int, pending_scales: dict
) -> Iterator[int]:
    """Write one recipe's bytes at `offset`; yields the bytes written by each step."""
    if isinstance(recipe, Packed):
        yield from _write_packed(fd, offset, recipe, checkpoint, chunk, pending_scales)
        return
    stack = recipe.stack
    rows, *rest = stack.shape
    row_bytes = math.prod(rest) * stack.dtype.itemsize
    step = max(1, chunk // max(1, row_bytes))
    if recipe.perm is None:  # stored order: bands of rows, one after another
        for start, band in stack.bands(checkpoint, step):
            data = _bytes(band)
            _pwrite(fd, data, offset + start * row_bytes)
            yield len(data)
    elif recipe.matrix() is not None:  # [N, K] -> [K, N]: a band of rows is a band of columns
        n, k = stack.shape
        item = stack.dtype.itemsize
        for start, band in stack.bands(checkpoint, step):
            band = band.T.contiguous()  # [K, width]
            width = band.shape[1]
            lines = np.asarray(_bytes(band)).reshape(k, width * item)
            for i, line in enumerate(lines):
                _pwrite(fd, line, offset + (i * n + start) * item)
            yield k * width * item
    else:
        if rows * row_bytes > WHOLE_LIMIT:
            raise AssertionError(f"permutation {recipe.perm} of a {stack.shape} weight is not streamed")
        whole = stack.rows(checkpoint, 0, rows).permute(recipe.perm).contiguous()
        data = _bytes(whole)
        _pwrite(fd, data, offset)
        yield len(data)


def _write_packed(
    fd: int, offset: int, recipe: Packed, checkpoint: Checkpoint, chunk: int, pending_scales: dict
) -> Iterator[int]:
    """Packed blocks, a band of output rows at a time; their scales are kept for the scales'
    own initializer, which the quantizer places right after (or computed again if not)."""
    stack = recipe.stack
    k = stack.shape[1]
    scale_type = NUMPY_TYPES[stack.dtype]
    if recipe.part == "scales" and stack in pending_scales:
        data = pending_scales.pop(stack).tobytes()
        _pwrite(fd, data, offset)
        yield len(data)
        return
    step = max(1, chunk // (4 * k))  # float32 rows per step
    position, scales = offset, []
    for _, band in stack.bands(checkpoint, step):
        packed, band_scales = pack(band.float().numpy().T, recipe.bits)
        scales.append(band_scales.astype(scale_type))
        if recipe.part == "packed":
            _pwrite(fd, packed, position)
            position += packed.nbytes
            yield packed.nbytes
    all_scales = np.concatenate(scales)
    if recipe.part == "packed":
        pending_scales[stack] = all_scales
    else:
        _pwrite(fd, all_scales.tobytes(), offset)
        yield all_scales.nbytes


def _bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # one element keeps its parent's stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _point(tensor: TensorProto, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
