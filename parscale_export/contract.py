"""The I/O contract of an exported bundle, version 1: one immutable object read by export,
runtime, validation and the manifest. Imports no torch: deployment needs only numpy.

Inputs:
  input_ids       int64 [batch, sequence]
  attention_mask  int64 [batch, past_sequence + sequence]   1 = real token, 0 = padding; never the prefix
  position_ids    int64 [batch, sequence]
  past_key_values.{i}.key / .value   [P*batch, kv_heads, past_sequence, head_dim]  (export dtype)
Outputs:
  logits          float32 [batch, sequence, vocab]
  present.{i}.key / .value           [P*batch, kv_heads, past_sequence + sequence, head_dim]

Row b*P + p of the folded batch is stream p of sequence b. Because a sequence's streams are
adjacent, the same memory is [batch, P*kv_heads, seq, head_dim]: bundles made for
onnxruntime-genai (`cache_layout = "heads"`) declare their cache in that shape. Their graphs
also accept genai's batches (model.PackedSlots): rows padded on the right, each row's new keys
written right after its last real token, positions read from the mask, and a present of
max(past_sequence, total_sequence) slots. With left padding that is exactly version 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import BundleError

CONTRACT_VERSION = 1
# Cache dtypes: the numpy type a host-side cache uses (numpy has no bfloat16: a bf16 cache only
# ever lives in ONNX Runtime OrtValues) and the ONNX element type that allocates one.
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}
ONNX_ELEMENT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}
CACHE_LAYOUTS = ("rows", "heads")
# ONNX Runtime's type strings, as sessions and OrtValues report them, to our dtype names.
ORT_TYPES = {
    "tensor(int64)": "int64",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
}

# The cache's length axis: the same in both layouts.
LENGTH_AXIS = 2
# Symbolic axis names, as written into the ONNX graph.
BATCH, SEQUENCE, PAST, TOTAL, ROWS = "batch", "sequence", "past_sequence", "total_sequence", "cache_rows"


@dataclass(frozen=True)
class Contract:
    num_layers: int
    parscale_n: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # dtype of the cache tensors: "float32", "float16" or "bfloat16"
    cache_layout: str = "rows"  # "rows": [P*batch, KV, seq, D]; "heads": [batch, P*KV, seq, D] (genai)
    version: int = CONTRACT_VERSION

    @property
    def np_dtype(self) -> type[np.floating]:
        if DTYPES[self.dtype] is None:
            raise BundleError(f"a {self.dtype} cache has no numpy type; it lives on the device only")
        return DTYPES[self.dtype]

    @property
    def onnx_element_type(self) -> int:
        return ONNX_ELEMENT_TYPES[self.dtype]

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def cache_shape(self, batch: int | str, length: int | str) -> tuple[int | str, ...]:
        if self.cache_layout == "heads":
            return (batch, self.parscale_n * self.num_kv_heads, length, self.head_dim)
        rows = self.parscale_n * batch if isinstance(batch, int) else ROWS
        return (rows, self.num_kv_heads, length, self.head_dim)

    def input_spec(self) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        """name -> (dtype, symbolic shape)."""
        spec = {
            "input_ids": ("int64", (BATCH, SEQUENCE)),
            "attention_mask": ("int64", (BATCH, TOTAL)),
            "position_ids": ("int64", (BATCH, SEQUENCE)),
        }
        return spec | {name: (self.dtype, self.cache_shape(BATCH, PAST)) for name in self.past_names()}

    def output_spec(self) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        spec = {"logits": ("float32", (BATCH, SEQUENCE, self.vocab_size))}
        return spec | {name: (self.dtype, self.cache_shape(BATCH, TOTAL)) for name in self.present_names()}

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length cache for `batch` sequences: the first call's past."""
        return [np.zeros(self.cache_shape(batch, 0), dtype=self.np_dtype) for _ in self.past_names()]

    def sequence_rows(self, sequences: Sequence[int] | np.ndarray) -> np.ndarray:
        """Indices along a cache tensor's first axis that hold `sequences`, in their order:
        rows b*P ... b*P+P-1 for the "rows" layout, index b for the "heads" layout."""
        sequences = np.asarray(sequences, dtype=np.int64)
        if self.cache_layout == "heads":
            return sequences
        return (sequences[:, None] * self.parscale_n + np.arange(self.parscale_n)).reshape(-1)

    def take_sequences(self, past: list[np.ndarray], sequences: Sequence[int], length: int) -> list[np.ndarray]:
        """The cache of `sequences` alone (in that order), keeping its last `length` positions.
        Continuous batching drops finished sequences and the left columns nobody needs any more."""
        rows = self.sequence_rows(sequences)
        return [np.ascontiguousarray(t[rows, :, t.shape[LENGTH_AXIS] - length :]) for t in past]

    def join_sequences(self, pasts: Sequence[list[np.ndarray]], length: int) -> list[np.ndarray]:
        """Several batches' caches as one batch (their sequences in order), each left-padded with
        zeros to `length` positions; the attention mask must mark the padding 0, so it adds nothing."""
        joined = []
        for tensors in zip(*pasts, strict=True):
            padded = [_pad_left(t, length) for t in tensors]
            joined.append(np.concatenate(padded, axis=0))
        return joined

    def check_outputs(self, outputs: dict[str, np.ndarray], batch: int, seq: int, past: int) -> list[str]:
        """Every way `outputs` breaks the contract for one call; empty when it holds."""
        sizes = {BATCH: batch, SEQUENCE: seq, PAST: past, TOTAL: past + seq, ROWS: self.parscale_n * batch}
        problems = []
        for name, (dtype, shape) in self.output_spec().items():
            if name not in outputs:
                problems.append(f"output {name!r} is missing")
                continue
            want = tuple(sizes.get(a, a) for a in shape)
            got = outputs[name]
            if got.shape != want:
                problems.append(f"output {name!r} has shape {list(got.shape)}, the contract says {list(want)}")
            if str(got.dtype) != dtype:  # numpy dtypes and device-side descriptions both print their name
                problems.append(f"output {name!r} has dtype {got.dtype}, the contract says {dtype}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contract:
        if data.get("version") != CONTRACT_VERSION:
            raise BundleError(
                f"bundle uses contract version {data.get('version')!r}; this tool reads {CONTRACT_VERSION}"
            )
        try:
            contract = cls(**data)
        except TypeError as exc:
            raise BundleError(f"malformed contract in manifest ({exc})") from None
        if contract.dtype not in DTYPES:
            raise BundleError(f"manifest names cache dtype {contract.dtype!r}; expected one of {', '.join(DTYPES)}")
        if contract.cache_layout not in CACHE_LAYOUTS:
            raise BundleError(f"manifest names cache layout {contract.cache_layout!r}")
        return contract


def _pad_left(tensor: np.ndarray, length: int) -> np.ndarray:
    missing = length - tensor.shape[LENGTH_AXIS]
    if missing < 0:
        raise ValueError(f"cache of length {tensor.shape[LENGTH_AXIS]} does not fit in {length}")
    widths = [(0, 0)] * tensor.ndim
    widths[LENGTH_AXIS] = (missing, 0)
    return np.pad(tensor, widths) if missing else tensor
