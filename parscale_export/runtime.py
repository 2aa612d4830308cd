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
    """An ONNX Runtime session over one bundle, or over one P of a family bundle (`parallel`;
    default: its largest P). Sessions given the same `shared` weights hold the backbone once."""

    def __init__(
        self,
        bundle_dir: Path,
        provider: str = "cpu",
        threads: int | None = None,
        parallel: int | None = None,
        shared: SharedWeights | None = None,
    ) -> None:
        self.manifest: Manifest = read_manifest(bundle_dir, parallel)
        self.contract = self.manifest.contract
        self.provider = resolve_provider(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.shared = shared  # the session reads its weights' memory: keep it alive as long as the session
        if shared is not None:
            shared.add_to(options, self.manifest.model_path)
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
        """One call of the graph. On CPU the cache is numpy; on CUDA it stays on the device as
        OrtValues between calls (IO binding), and only the logits come back to the host."""
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions(attention_mask, input_ids.shape[1]),
        }
        if self.provider == "cuda":
            return self._run_on_device(feeds, past)
        feeds |= dict(zip(self.contract.past_names(), past, strict=True))
        logits, *present = self.session.run(self.contract.output_names(), feeds)
        return logits, present

    def _run_on_device(self, feeds: dict[str, np.ndarray], past: list) -> tuple[np.ndarray, list]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.contract.past_names(), past, strict=True):
            if isinstance(value, np.ndarray):  # the first call's empty past, or a cache the caller built
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.contract.present_names():
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.contract.empty_past(batch)


def load_family(
    bundle_dir: Path, sizes: list[int] | None = None, provider: str = "cpu", threads: int | None = None
) -> dict[int, Runtime]:
    """A Runtime per P of a family bundle (every P by default), all over one copy of the backbone."""
    manifest = read_manifest(bundle_dir)
    if not manifest.family:
        raise BundleError(f"{bundle_dir}: not a family bundle (it holds P={manifest.contract.parscale_n} only)")
    shared = SharedWeights(bundle_dir)
    return {p: Runtime(bundle_dir, provider, threads, parallel=p, shared=shared) for p in sizes or manifest.family}
