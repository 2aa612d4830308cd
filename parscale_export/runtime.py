"""ONNX Runtime over a bundle: the contract's one call, plus prefill/extend/greedy from Stepper.

Imports no torch: a deployment needs only onnxruntime and numpy.
"""

from __future__ import annotations

import functools
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Manifest, read_manifest
from .errors import BundleError, ProviderError
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
            "onnxruntime-gpu, CUDA 13 and cuDNN 9)"
        )
    return "cpu"


class Runtime(Stepper):
    """An ONNX Runtime session over one bundle."""

    def __init__(self, bundle_dir: Path, provider: str = "cpu", threads: int | None = None) -> None:
        self.manifest: Manifest = read_manifest(bundle_dir)
        self.contract = self.manifest.contract
        self.provider = resolve_provider(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = [PROVIDER_NAMES[self.provider]] + (["CPUExecutionProvider"] if self.provider == "cuda" else [])
        try:
            self.session = ort.InferenceSession(str(self.manifest.model_path), options, providers=providers)
        except Exception as exc:
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

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One call of the graph. Contract v1 on CPU runs on numpy. Otherwise the cache lives in
        OrtValues (IO binding): on CUDA it stays on the device between calls, and an in-place
        cache (contract v2) is bound as both past and present, so no call copies it. Only the
        logits come back to the host."""
        self.contract.check_room(_slots(past[0]), attention_mask.shape[1])
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

    def _run_bound(self, feeds: dict[str, np.ndarray], past: list) -> tuple[np.ndarray, list]:
        device = "cuda" if self.provider == "cuda" else "cpu"
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
                binding.bind_output(present_name, device, 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), past if self.contract.cache.in_place else present

    def _on_device(self, value: np.ndarray | ort.OrtValue) -> ort.OrtValue:
        """An OrtValue where this session computes (a CPU one shares the numpy array's memory)."""
        if isinstance(value, ort.OrtValue):
            return value
        return ort.OrtValue.ortvalue_from_numpy(value, "cuda" if self.provider == "cuda" else "cpu", 0)

    def empty_past(self, batch: int, tokens: int | None = None) -> list:
        """The contract's first past; an in-place cache is allocated here, once, as OrtValues."""
        past = self.contract.empty_past(batch, tokens)
        return [self._on_device(value) for value in past] if self.contract.cache.in_place else past


def _slots(value: np.ndarray | ort.OrtValue) -> int:
    """Length of a cache tensor's slot axis, without copying it from the device."""
    shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
    return shape[2]
