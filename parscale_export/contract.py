"""The I/O contract of an exported bundle: one immutable object read by export, runtime,
validation and the manifest. Imports no torch: deployment needs only numpy.

`convert` writes version 3 unless told otherwise. Versions 2 and 3 are read as version 1's
names and inputs with a different cache, so this docstring describes them in that order.

Version 1 (`convert --cache dynamic`, or any --opset below 23): the cache grows by concatenation.
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

Version 2 (`convert --cache static --max-length N`): fixed-capacity buffers written in place.
  past_key_values.{i}.key / .value   [batch, P*kv_heads, capacity, head_dim]
  present.{i}.key / .value           the same buffers, after this call's write
The ids, mask and positions mean what they mean in version 1. Token column j of the mask
(left padding included) lives in slot j. Each call writes its new keys/values at slots
[past, past + sequence) and the learned prefix (T slots, no RoPE) right after them, so after
any call slots [0, total) hold the tokens, [total, total + T) the prefix, and the rest is
unused and masked. The caller allocates zeros of capacity >= T + total and binds past and
present to the same memory; a call that would need more slots is refused (CapacityError).

Version 3 (`convert`, or `--cache gqa`; `--max-length N`): version 2's buffers and inputs, read
by ONNX Runtime's GroupQueryAttention, which attends only over the slots in use. The prefix sits in slots
[0, T), written by a sequence's first call (the call whose mask is as long as its input); token
column j of the mask lives in slot T + j. Left padding is hidden by the mask, as in v1. A call
with several new tokens over a past is refused for batch > 1 (ONNX Runtime's kernel takes those
one sequence at a time).

Versions 2 and 3 with `fixed_capacity` (what `--genai` writes): the graph declares the buffers'
length, T + max_length, as a number; buffers of any other length are refused by ONNX Runtime.
onnxruntime-genai sizes its shared buffer from that number (see genai.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import BundleError, CapacityError, UsageError

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
CAPACITY = "cache_capacity"


@dataclass(frozen=True)
class CacheKind:
    """What distinguishes the contract versions, as data."""

    past_axis: str  # symbolic length of the past inputs
    present_axis: str  # symbolic length of the present outputs
    in_place: bool  # present is the past buffer, written at the sequence's position
    opset: int  # ONNX opset the graph needs (TensorScatter arrived in 24)
    attention: str  # how the graph writes and reads the cache (model.ParScaleModel._step)
    batched_chunks: bool = True  # several new tokens over a past, for several sequences in one call


CACHE_KINDS = {
    1: CacheKind(past_axis=PAST, present_axis=TOTAL, in_place=False, opset=23, attention="append"),
    2: CacheKind(past_axis=CAPACITY, present_axis=CAPACITY, in_place=True, opset=24, attention="scatter"),
    # ONNX Runtime's GroupQueryAttention refuses several new tokens over a past when batch > 1.
    3: CacheKind(
        past_axis=CAPACITY,
        present_axis=CAPACITY,
        in_place=True,
        opset=23,
        attention="grouped_query",
        batched_chunks=False,
    ),
}
CACHE_NAMES = {"dynamic": 1, "static": 2, "gqa": 3}  # `convert --cache` -> contract version


@dataclass(frozen=True)
class Contract:
    num_layers: int
    parscale_n: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # dtype of the cache tensors: "float32", "float16" or "bfloat16"
    cache_layout: str = "rows"  # "rows": [P*batch, KV, seq, D]; "heads": [batch, P*KV, seq, D] (genai)
    version: int = 1
    prefix_slots: int = 0  # versions 2, 3: the learned prefix's slots in each buffer (T, or 0 when P = 1)
    max_length: int | None = None  # versions 2, 3: the most tokens (past + new) one sequence may hold
    # Versions 2, 3: the graph declares its buffers' length as the number `capacity`, not an axis.
    # onnxruntime-genai then allocates exactly that many slots, whatever max_length a request sets.
    fixed_capacity: bool = False

    @property
    def cache(self) -> CacheKind:
        return CACHE_KINDS[self.version]

    @property
    def np_dtype(self) -> type[np.floating]:
        if DTYPES[self.dtype] is None:
            raise BundleError(f"a {self.dtype} cache has no numpy type; it lives on the device only")
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        """Bytes per cache element (bfloat16 has no numpy type, but two bytes)."""
        return 2 if self.dtype == "bfloat16" else np.dtype(self.np_dtype).itemsize

    @property
    def capacity(self) -> int:
        """Slots in a buffer that holds max_length tokens: the prefix's and the tokens'."""
        return self.prefix_slots + (self.max_length or 0)

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

    def _cache_axis(self, axis: str) -> int | str:
        return self.capacity if self.fixed_capacity and axis == CAPACITY else axis

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
        past = self.cache_shape(BATCH, self._cache_axis(self.cache.past_axis))
        return spec | {name: (self.dtype, past) for name in self.past_names()}

    def output_spec(self) -> dict[str, tuple[str, tuple[int | str, ...]]]:
        spec = {"logits": ("float32", (BATCH, SEQUENCE, self.vocab_size))}
        present = self.cache_shape(BATCH, self._cache_axis(self.cache.present_axis))
        return spec | {name: (self.dtype, present) for name in self.present_names()}

    def cache_slots(self, tokens: int | None) -> int:
        """Length of the first call's past for sequences that will hold `tokens` tokens in all
        (None: as many as the bundle allows). Version 1 starts empty; versions 2 and 3 allocate
        once: just enough, or the whole capacity when the graph declares it."""
        if not self.cache.in_place:
            return 0
        limit = self.max_length or 0
        if tokens is not None and tokens > limit:
            raise CapacityError(
                f"{tokens} tokens (prompt + new) do not fit this bundle's cache (max_length {limit}); "
                "convert again with a larger --max-length"
            )
        if tokens is None or self.fixed_capacity:
            return self.capacity
        return self.prefix_slots + tokens

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
        self._check_movable()
        rows = self.sequence_rows(sequences)
        return [np.ascontiguousarray(t[rows, :, t.shape[LENGTH_AXIS] - length :]) for t in past]

    def join_sequences(self, pasts: Sequence[list[np.ndarray]], length: int) -> list[np.ndarray]:
        """Several batches' caches as one batch (their sequences in order), each left-padded with
        zeros to `length` positions; the attention mask must mark the padding 0, so it adds nothing."""
        self._check_movable()
        joined = []
        for tensors in zip(*pasts, strict=True):
            padded = [_pad_left(t, length) for t in tensors]
            joined.append(np.concatenate(padded, axis=0))
        return joined

    def _check_movable(self) -> None:
        if self.cache.in_place:  # v2's buffers hold the prefix after the tokens: not a column slice
            raise BundleError("moving sequences between batches is defined for contract v1 caches only")

    def empty_past(self, batch: int, tokens: int | None = None) -> list[np.ndarray]:
        """The first call's past for `batch` sequences: zero-length (version 1) or zero-filled
        buffers with room for `tokens` tokens (version 2)."""
        shape = self.cache_shape(batch, self.cache_slots(tokens))
        return [np.zeros(shape, dtype=self.np_dtype) for _ in self.past_names()]

    def check_call(self, batch: int, seq: int, total: int) -> None:
        """Refuse a call this contract's graph cannot make (ONNX Runtime would fail mid-run)."""
        if not self.cache.batched_chunks and batch > 1 and 1 < seq < total:
            raise UsageError(
                f"contract v{self.version} (GroupQueryAttention) takes several new tokens over a past for one "
                f"sequence at a time, not {batch}: feed a batch's chunks one sequence at a time, or convert with "
                "--cache static"
            )

    def check_room(self, slots: int, total: int) -> None:
        """Refuse a call after which a sequence would hold `total` tokens in a past of `slots`
        slots: a fixed buffer never wraps or grows silently."""
        if self.cache.in_place and self.prefix_slots + total > slots:
            raise CapacityError(
                f"the cache is full: this call needs room for {total} tokens, the buffers hold "
                f"{slots - self.prefix_slots} (max_length {self.max_length}); start a new sequence"
            )

    def check_outputs(
        self, outputs: dict[str, np.ndarray], batch: int, seq: int, past: int, slots: int = 0
    ) -> list[str]:
        """Every way `outputs` breaks the contract for one call (`slots`: the buffers' length,
        version 2); empty when it holds."""
        sizes = {BATCH: batch, SEQUENCE: seq, PAST: past, TOTAL: past + seq, ROWS: self.parscale_n * batch}
        sizes[CAPACITY] = slots
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
        if data.get("version") not in CACHE_KINDS:
            raise BundleError(
                f"bundle uses contract version {data.get('version')!r}; "
                f"this tool reads {', '.join(map(str, CACHE_KINDS))}"
            )
        try:
            contract = cls(**data)
        except TypeError as exc:
            raise BundleError(f"malformed contract in manifest ({exc})") from None
        if contract.dtype not in DTYPES:
            raise BundleError(f"manifest names cache dtype {contract.dtype!r}; expected one of {', '.join(DTYPES)}")
        if contract.cache_layout not in CACHE_LAYOUTS:
            raise BundleError(f"manifest names cache layout {contract.cache_layout!r}")
        if contract.cache.in_place and not (
            contract.cache_layout == "heads" and isinstance(contract.max_length, int) and contract.max_length > 0
        ):
            raise BundleError(f"contract version {contract.version} needs the heads layout and a positive max_length")
        if contract.fixed_capacity and not contract.cache.in_place:
            raise BundleError(f"contract version {contract.version} has no fixed capacity to declare")
        return contract


def _pad_left(tensor: np.ndarray, length: int) -> np.ndarray:
    missing = length - tensor.shape[LENGTH_AXIS]
    if missing < 0:
        raise ValueError(f"cache of length {tensor.shape[LENGTH_AXIS]} does not fit in {length}")
    widths = [(0, 0)] * tensor.ndim
    widths[LENGTH_AXIS] = (missing, 0)
    return np.pad(tensor, widths) if missing else tensor
