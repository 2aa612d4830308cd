"""ONNX Runtime over a bundle: the contract's one call, plus prefill/extend/greedy from Stepper.

Imports no torch: a deployment needs only onnxruntime and numpy.
"""

from __future__ import annotations

import ctypes
import functools
import io
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Manifest, read_manifest
from .errors import BundleError, ProviderError
from .placement import Placement, read_placement
from .sharing import SharedWeights
from .stepping import Stepper, positions

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@functools.cache
def cuda_available() -> bool:
    """Whether a CUDA session can really start (onnxruntime-gpu lists CUDA even without a GPU)."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and _probe_cuda()


def _probe_cuda() -> bool:
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where installed
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            ort.preload_dlls()
    ort.set_default_logger_severity(4)  # a failure to load CUDA is the answer here, not an error to print
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[PROVIDER_NAMES["cuda"]])
    except Exception:  # any failure to start means "no CUDA here"
        return False
    finally:
        ort.set_default_logger_severity(2)
    return session.get_providers()[0] == PROVIDER_NAMES["cuda"]


def cuda_unavailable_reason() -> str:
    """Why the CUDA provider library cannot load here, in the dynamic loader's words (a missing
    libcublasLt.so.13 or libcudnn.so.9, usually); ONNX Runtime itself only logs it and falls back."""
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return f"this onnxruntime ({ort.__version__}) has no CUDA provider library; install onnxruntime-gpu"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return str(exc)
    return "the CUDA provider library loads, but a CUDA session did not start (no usable GPU?)"


def provider_list(provider: str, tf32: bool = False) -> list:
    """The providers argument of an InferenceSession. On CUDA, TF32 is off unless asked for:
    ONNX Runtime turns it on by default for float32 MatMul, which moves fp32 logits by ~1e-3
    and would make an exact fp32 bundle look drifted."""
    if provider == "cuda":
        return [(PROVIDER_NAMES["cuda"], {"use_tf32": "1" if tf32 else "0"}), PROVIDER_NAMES["cpu"]]
    return [PROVIDER_NAMES[provider]]


def resolve_provider(provider: str) -> str:
    """'auto' -> 'cuda' when a CUDA session can start, else 'cpu'. 'cuda' without CUDA is an error."""
    if provider not in ("auto", *PROVIDER_NAMES):
        raise ProviderError(f"unknown provider {provider!r}; choose auto, cuda or cpu")
    if provider == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if provider == "cuda":
        raise ProviderError(
            "CUDA requested, but ONNX Runtime cannot start its CUDA execution provider here "
            f"(available: {', '.join(ort.get_available_providers())}; needs an NVIDIA GPU, "
            f"onnxruntime-gpu, CUDA 13 and cuDNN 9): {cuda_unavailable_reason()}"
        )
    return "cpu"


class Runtime(Stepper):
    """An ONNX Runtime session over one bundle, or over one P of a family bundle (`parallel`;
    default: its largest P). Sessions given the same `shared` weights hold the backbone once.

    `profile` records the session's node placement until `placement()` is called (validate
    uses it to prove where the heavy nodes ran); `tf32` allows TF32 math on CUDA. `graph`, a
    serialized model over the same weight files, runs instead of the bundle's (validate's exact
    phases change one attribute of a quantized graph)."""

    def __init__(
        self,
        bundle_dir: Path,
        provider: str = "cpu",
        threads: int | None = None,
        parallel: int | None = None,
        shared: SharedWeights | None = None,
        tf32: bool = False,
        profile: bool = False,
        graph: bytes | None = None,
    ) -> None:
        self.manifest: Manifest = read_manifest(bundle_dir, parallel)
        self.contract = self.manifest.contract
        self.provider = resolve_provider(provider)
        if self.contract.dtype == "bfloat16" and self.provider != "cuda":
            raise ProviderError(
                f"{bundle_dir}: a bfloat16 bundle runs on CUDA only; ONNX Runtime's CPU provider has no "
                "bfloat16 kernels (MatMul, Add, Mul, Softmax...). Convert with --dtype fp32 for the CPU"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.shared = shared  # the session reads its weights' memory: keep it alive as long as the session
        if shared is not None:
            shared.add_to(options, self.manifest.model_path)
        self._profile_dir = Path(tempfile.mkdtemp(prefix="parscale-profile-")) if profile else None
        if self._profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = str(self._profile_dir / "ort")
        if graph is not None:  # a graph from memory finds its external data here
            folder = str(self.manifest.model_path.parent)
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            self.session = ort.InferenceSession(
                graph or str(self.manifest.model_path), options, providers=provider_list(self.provider, tf32)
            )
        except Exception as exc:
            if self._profile_dir:
                shutil.rmtree(self._profile_dir, ignore_errors=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{self.manifest.model_path}: ONNX Runtime cannot load it ({first})") from None
        actual = self.session.get_providers()[0]
        if actual != PROVIDER_NAMES[self.provider]:
            raise ProviderError(f"asked ONNX Runtime for {PROVIDER_NAMES[self.provider]}, it started {actual}")
        names = [i.name for i in self.session.get_inputs()]
        if names != self.contract.input_names():
            raise BundleError(
                f"{self.manifest.model_path}: graph inputs do not follow contract v{self.contract.version}"
            )
        self._copier: ort.InferenceSession | None = None  # copy_row's graph, made on first use

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One call of the graph. Contract v1 on CPU runs on numpy. Otherwise the cache lives in
        OrtValues (IO binding): on CUDA it stays on the device between calls, and an in-place
        cache (contracts v2 and v3) is bound as both past and present, so no call copies it. Only the
        logits come back to the host."""
        self.contract.check_room(cache_slots(past[0]), attention_mask.shape[1])
        self.contract.check_call(*input_ids.shape, attention_mask.shape[1])
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions(attention_mask, input_ids.shape[1]),
        }
        if self.provider == "cpu" and not self.contract.cache.in_place:
            feeds |= dict(zip(self.contract.past_names(), past, strict=True))
            logits, *present = self.session.run(self.contract.output_names(), feeds)
            return logits, present
        return self._run_bound(feeds, past)

    @property
    def batched_chunks(self) -> bool:
        return self.contract.cache.batched_chunks

    def _run_bound(self, feeds: dict[str, np.ndarray], past: list) -> tuple[np.ndarray, list]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the order of binding
        past = [self._on_device(value) for value in past]
        names = zip(self.contract.past_names(), self.contract.present_names(), past, strict=True)
        for past_name, present_name, value in names:
            binding.bind_ortvalue_input(past_name, value)
            if self.contract.cache.in_place:
                binding.bind_ortvalue_output(present_name, value)  # written in place: present is past
            else:
                binding.bind_output(present_name, self.provider, 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), past if self.contract.cache.in_place else present

    def _on_device(self, value: np.ndarray | ort.OrtValue) -> ort.OrtValue:
        """An OrtValue where this session computes (a CPU one shares the numpy array's memory)."""
        if isinstance(value, ort.OrtValue):
            return value
        return ort.OrtValue.ortvalue_from_numpy(value, self.provider, 0)  # ORT's device names are ours

    def empty_past(self, batch: int, tokens: int | None = None) -> list:
        """The contract's first past. An in-place cache (v2) is allocated here, once, zeroed, as
        OrtValues where the session computes; on CUDA a v1 past is a zero-length device OrtValue
        (bfloat16 has no numpy type, and the cache never leaves the device anyway)."""
        if self.contract.cache.in_place:
            return [self._on_device(value) for value in self.contract.empty_past(batch, tokens)]
        if self.provider != "cuda":
            return self.contract.empty_past(batch)
        shape = self.contract.cache_shape(batch, 0)
        allocate = ort.OrtValue.ortvalue_from_shape_and_type
        return [allocate(shape, self.contract.onnx_element_type, "cuda", 0) for _ in self.contract.past_names()]

    def run_rows(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, buffers: list[ort.OrtValue], first: int
    ) -> np.ndarray:
        """One call over rows [first, first + batch) of in-place buffers (contracts v2, v3), each
        [rows, P*KV, capacity, D] as `empty_past(rows)` allocates them: those rows are bound by
        address as both past and present, so nothing is copied and no other row is read or
        written. Returns the logits. Rows may be padded on the right (model.PackedSlots)."""
        if not self.contract.cache.in_place:
            raise BundleError(f"contract v{self.contract.version} has no fixed buffers to run rows of")
        batch, seq = input_ids.shape
        self.contract.check_room(cache_slots(buffers[0]), attention_mask.shape[1])
        self.contract.check_call(batch, seq, attention_mask.shape[1])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", positions(attention_mask, seq))
        binding.bind_output("logits", "cpu")
        element = self.contract.onnx_element_type
        for past_name, present_name, buffer in zip(
            self.contract.past_names(), self.contract.present_names(), buffers, strict=True
        ):
            shape, address = row_span(buffer, first, batch)
            binding.bind_input(past_name, self.provider, 0, element, shape, address)
            binding.bind_output(present_name, self.provider, 0, element, shape, address)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def copy_row(self, buffers: list[ort.OrtValue], source: int, target: int, slots: int) -> None:
        """Copy the first `slots` slots of row `source` into row `target` of every buffer, where
        the buffers live (on the device under CUDA): one sequence's cache, nothing else."""
        if self._copier is None:
            _, heads, _, head_dim = self.contract.cache_shape(1, 0)
            graph = _row_copier(self.contract.onnx_element_type, heads, head_dim)
            self._copier = ort.InferenceSession(graph, providers=provider_list(self.provider))
        element = self.contract.onnx_element_type
        for buffer in buffers:
            (shape, source_at), (_, target_at) = row_span(buffer, source, 1), row_span(buffer, target, 1)
            binding = self._copier.io_binding()
            binding.bind_input("source", self.provider, 0, element, shape, source_at)
            binding.bind_input("target", self.provider, 0, element, shape, target_at)
            binding.bind_cpu_input("slots", np.array([slots], dtype=np.int64))
            binding.bind_output("copied", self.provider, 0, element, shape, target_at)
            self._copier.run_with_iobinding(binding)

    def placement(self) -> Placement:
        """Stop profiling and say which provider ran each op type so far. Needs `profile=True`
        and at least one call; the profile file is removed."""
        if self._profile_dir is None:
            raise ValueError("placement() needs a Runtime created with profile=True")
        try:
            return read_placement(Path(self.session.end_profiling()))
        finally:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None


def cache_slots(value: np.ndarray | ort.OrtValue) -> int:
    """Length of a cache tensor's slot axis, without copying it from the device."""
    shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
    return shape[2]


def load_family(
    bundle_dir: Path, sizes: list[int] | None = None, provider: str = "cpu", threads: int | None = None
) -> dict[int, Runtime]:
    """A Runtime per P of a family bundle (every P by default), all over one copy of the backbone."""
    manifest = read_manifest(bundle_dir)
    if not manifest.family:
        raise BundleError(f"{bundle_dir}: not a family bundle (it holds P={manifest.contract.parscale_n} only)")
    shared = SharedWeights(bundle_dir)
    return {p: Runtime(bundle_dir, provider, threads, parallel=p, shared=shared) for p in sizes or manifest.family}


# Serving an in-place cache (contracts v2, v3) row by row: parscale_export.rows.RowBatcher.


def row_span(buffer: ort.OrtValue, first: int, count: int) -> tuple[list[int], int]:
    """Shape and address of rows [first, first + count) of a buffer [rows, ...]: a buffer's rows
    lie one after another, so any run of them is a tensor of its own, with no copy."""
    rows, *rest = buffer.shape()
    if not 0 <= first <= first + count <= rows:
        raise ValueError(f"rows [{first}, {first + count}) are outside a buffer of {rows}")
    return [count, *rest], buffer.data_ptr() + first * (buffer.tensor_size_in_bytes() // rows)


def _row_copier(element_type: int, heads: int, head_dim: int) -> bytes:
    """A graph that copies the first `slots` slots of one row [1, heads, capacity, head_dim] into
    another, in place: TensorScatter writes them into `target`, whose present is bound to the
    same memory, so only those slots move."""
    from onnx import TensorProto, helper

    row = [1, heads, "capacity", head_dim]
    nodes = [
        helper.make_node("Constant", [], ["zero"], value_ints=[0]),
        helper.make_node("Constant", [], ["axis"], value_ints=[2]),
        helper.make_node("Slice", ["source", "zero", "slots", "axis"], ["part"]),
        helper.make_node("TensorScatter", ["target", "part"], ["copied"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "row_copier",
        [
            helper.make_tensor_value_info("source", element_type, row),
            helper.make_tensor_value_info("target", element_type, row),
            helper.make_tensor_value_info("slots", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("copied", element_type, row)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10).SerializeToString()
