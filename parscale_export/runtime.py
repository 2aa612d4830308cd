"""ONNX Runtime over a bundle: one call per step, prefill and decode, greedy generation.

Imports no torch: a deployment needs only onnxruntime and numpy. The caller-visible state is
the contract's: the attention mask over real tokens and the per-layer caches, rows b*P + p.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Manifest, read_manifest
from .errors import BundleError, ProviderError

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class State:
    """What a sequence batch carries between calls."""

    attention_mask: np.ndarray  # int64 [B, past]: real tokens seen so far (1) and padding (0)
    past: list[np.ndarray]  # per layer key, value: [P*B, KV, past, D]

    @property
    def past_length(self) -> int:
        return self.attention_mask.shape[1]


def positions(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last `seq` columns: count of real tokens before each, padding at 0."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, -seq:].astype(np.int64)


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
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure is the answer here, not an error to print
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDER_NAMES["cuda"]])
    except Exception:
        return False
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


class Runtime:
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

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph. `attention_mask` covers past and new tokens; positions follow from it."""
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": positions(attention_mask, input_ids.shape[1]),
        }
        feeds |= dict(zip(self.contract.past_names(), past, strict=True))
        logits, *present = self.session.run(self.contract.output_names(), feeds)
        return logits, present

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, State]:
        """The first call: an empty past. Left-padded rows carry 0 in the mask."""
        logits, present = self.run(input_ids, attention_mask, self.contract.empty_past(input_ids.shape[0]))
        return logits, State(attention_mask.astype(np.int64), present)

    def extend(self, input_ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Feed more tokens (one for a decode step, several for a chunked prefill) after `state`."""
        batch, seq = input_ids.shape
        mask = np.concatenate([state.attention_mask, np.ones((batch, seq), np.int64)], axis=1)
        logits, present = self.run(input_ids, mask, state.past)
        return logits, State(mask, present)

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> np.ndarray:
        """`steps` greedy tokens per row [B, steps] after a left-padded prompt."""
        logits, state = self.prefill(input_ids, attention_mask)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            logits, state = self.extend(tokens[-1][:, None], state)
            tokens.append(logits[:, -1].argmax(-1))
        return np.stack(tokens, axis=1)
