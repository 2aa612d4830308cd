"""Checkpoint -> ONNX bundle. The graph is `model.ParScaleForCausalLM` behind a flat signature
whose names and axes come from the contract.

The graph is traced without weights (fake tensors) and optimized as torch.onnx would; each weight
initializer is then a recipe (weightwriter), and the weights stream from the checkpoint into the
data file one band of rows at a time: a convert's memory does not grow with the model.

The bundle is built in a temporary directory beside the target and renamed into place only
when everything succeeded, so a failure or Ctrl-C never leaves a half-written bundle.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import ml_dtypes
import onnx
import onnx_ir as ir
import onnx_ir.convenience
import onnx_ir.passes.common
import onnxscript.optimizer
import torch
from onnxscript import values
from onnxscript.onnx_opset import opset18, opset23, opset24
from onnxscript.rewriter import onnx_fusions
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim

from . import __version__
from .bundle import COPIED_FILES, DATA_FILE, FORMAT, MANIFEST_FILE, MODEL_FILE
from .checkpoint import Checkpoint, weights_digest
from .config import ModelConfig, load_config, special_tokens
from .contract import BATCH, CACHE_KINDS, CACHE_NAMES, SEQUENCE, TOTAL, CacheKind, Contract
from .environment import package_versions
from .errors import BundleError, OutputError, UsageError
from .genai import GENAI_CONFIG, genai_config
from .intweights import BITS
from .model import ParScaleForCausalLM, RotaryEmbedding, stacked_names
from .quantize import quantize_graph
from .weightwriter import Plain, Progress, Stack, nbytes, write_data

# Contract v1 exports at opset 23 by default (ONNX's fused Attention op and RMSNormalization;
# fastest on CPU in our study); v2 needs 24, for TensorScatter. The contract's CacheKind says which.
OPSET = 23
# --opset: below 23 torch.onnx writes attention and RMSNorm as MatMul, Softmax, ReduceMean...;
# 18 is its own base opset (lower ones go through onnx's version converter, which fails on this
# graph's dynamic axes and leaves the model at 18).
OPSETS = range(18, OPSET + 1)
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Example sizes for tracing: all >= 2, so the exporter specialises no dynamic axis to 0 or 1.
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 3, 4

Log = Callable[[str], None]
# convert without --cache: contract v3, in place and reading only the slots in use (issue 20).
DEFAULT_CACHE = "gqa"
# --max-length left unset: the model's context, capped, because genai allocates a sequence's whole
# capacity up front, and a ParScale cache is P times a plain model's (1.8B P=8 in fp32: 0.56 MiB
# a token, 2.3 GiB at 4096).
DEFAULT_MAX_LENGTH = 4096


# ONNX Runtime's contrib ops, described for onnxscript, which only knows standard ONNX's schemas.
CONTRIB = values.Opset("com.microsoft", 1)
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_PARAM, _OPTIONAL = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
_ATTRIBUTE, _ATTR = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType


def _contrib_op(name: str, inputs: list, outputs: list, types: list, attributes: list) -> values.Op:
    schema = onnx.defs.OpSchema(name, CONTRIB.domain, CONTRIB.version, inputs=inputs, outputs=outputs,
                                type_constraints=types, attributes=attributes)  # fmt: skip
    return values.Op(CONTRIB, name, op_schema=schema)


SKIP_NORM = _contrib_op(
    "SkipSimplifiedLayerNormalization",
    inputs=[_PARAM("input", "T"), _PARAM("skip", "T"), _PARAM("gamma", "T")],
    outputs=[_PARAM("output", "T"), _PARAM("mean", "U", param_option=_OPTIONAL),
             _PARAM("inv_std_var", "U", param_option=_OPTIONAL),
             _PARAM("input_skip_bias_sum", "T", param_option=_OPTIONAL)],
    types=[("T", FLOATS, ""), ("U", ["tensor(float)"], "")],
    attributes=[_ATTRIBUTE("epsilon", _ATTR.FLOAT, "")],
)  # fmt: skip

# GroupQueryAttention with the inputs contract v3 uses (the later optional ones stay unset).
_GQA_INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
               "cos_cache", "sin_cache", "position_ids", "attention_bias"]  # fmt: skip
_GQA_TYPES = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "I"}
GROUP_QUERY_ATTENTION = _contrib_op(
    "GroupQueryAttention",
    inputs=[_PARAM(n, _GQA_TYPES.get(n, "T")) if n in ("query", "seqlens_k", "total_sequence_length")
            else _PARAM(n, _GQA_TYPES.get(n, "T"), param_option=_OPTIONAL) for n in _GQA_INPUTS],
    outputs=[_PARAM("output", "T"), _PARAM("present_key", "T"), _PARAM("present_value", "T")],
    types=[("T", FLOATS, ""), ("M", ["tensor(int32)"], ""), ("I", ["tensor(int64)"], "")],
    attributes=[_ATTRIBUTE("num_heads", _ATTR.INT, ""), _ATTRIBUTE("kv_num_heads", _ATTR.INT, "")],
)  # fmt: skip


@dataclass(frozen=True)
class ConvertResult:
    out_dir: Path
    files: dict[str, int]  # file name -> size in bytes
    seconds: float
    config: ModelConfig


class ExportGraph(nn.Module):
    """The model with a flat signature: ids, mask, positions, then past key/value per layer.

    Contract v1 with the heads layout declares the cache [B, P*KV, L, D] (what onnxruntime-genai
    expects) instead of [B*P, KV, L, D]; the reshapes between the two are free in PyTorch, but
    ONNX Runtime copies at a graph boundary. Contract v2 declares its buffers in the layout
    attention runs in, so they pass through untouched.
    Heads-layout graphs (--genai, and every v2 graph) are also `packed` (model.PackedSlots): genai's batching
    pads rows on the right.
    """

    def __init__(self, lm: ParScaleForCausalLM, contract: Contract) -> None:
        super().__init__()
        self.lm = lm
        self.attention = contract.cache.attention
        self.reshape = contract.cache_layout == "heads" and not contract.cache.in_place
        # Packed (model.PackedSlots) wherever genai may drive the graph: the heads layout, which
        # v2 always has. With the left padding our runtime feeds, packed is the same computation.
        self.packed = contract.cache_layout == "heads"

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: tuple[Tensor, ...]):
        c = self.lm.config
        if self.reshape:
            past = tuple(t.reshape(-1, c.num_kv_heads, t.shape[2], c.head_dim) for t in past)
        pairs = list(zip(past[0::2], past[1::2], strict=True))
        logits, presents = self.lm(input_ids, attention_mask, position_ids, pairs, self.packed, self.attention)
        flat = [t for kv in presents for t in kv]
        if self.reshape:
            batch = input_ids.shape[0]
            flat = [t.reshape(batch, c.parscale_n * c.num_kv_heads, t.shape[2], c.head_dim) for t in flat]
        return (logits, *flat)


def _rotary(x, cos, sin):
    """model.rope in ONNX (opset 23+): one RotaryEmbedding, x [B, N, S, D], cos/sin [B, S, D/2]."""
    return opset23.RotaryEmbedding(x, cos, sin)


def _rotary_decomposed(x, cos, sin):
    """model.rope for opsets before RotaryEmbedding (--opset 18 to 22)."""
    x1, x2 = opset18.Split(x, axis=-1, num_outputs=2)
    axis = opset18.Constant(value_ints=[1])
    cos, sin = opset18.Unsqueeze(cos, axis), opset18.Unsqueeze(sin, axis)
    first = opset18.Sub(opset18.Mul(x1, cos), opset18.Mul(x2, sin))
    second = opset18.Add(opset18.Mul(x2, cos), opset18.Mul(x1, sin))
    return opset18.Concat(first, second, axis=-1)


def _add_rms_norm(x, update, weight, eps: float):
    """model.add_rms_norm in ONNX (opset 23+): ONNX Runtime's SkipSimplifiedLayerNormalization,
    whose fourth output is the sum (the residual stream)."""
    normed, _, _, total = SKIP_NORM(x, update, weight, epsilon=eps)
    return normed, total


def _add_rms_norm_decomposed(x, update, weight, eps: float):
    """model.add_rms_norm in standard ONNX (--opset 18 to 22): Qwen2's RMSNorm spelled out."""
    total = opset18.Add(x, update)
    x32 = opset18.Cast(total, to=onnx.TensorProto.FLOAT)
    mean = opset18.ReduceMean(opset18.Mul(x32, x32), opset18.Constant(value_ints=[-1]), keepdims=1)
    scale = opset18.Reciprocal(opset18.Sqrt(opset18.Add(mean, opset18.Constant(value_float=eps))))
    return opset18.Mul(weight, opset18.CastLike(opset18.Mul(x32, scale), total)), total


def _rotary_heads_last(x, cos, sin, heads: int):
    """model.rope_heads_last in ONNX: one RotaryEmbedding over x [B, S, heads*D]."""
    return opset23.RotaryEmbedding(x, cos, sin, num_heads=heads)


def _group_query_attention(q, k, v, buffer_k, buffer_v, prefix_k, prefix_v, last, first, bias, bias_shape, total):
    """model.group_query_attention in ONNX: GroupQueryAttention, past and present one buffer.
    With a prefix (P > 1), a first call puts its T rows in front of the new keys, values and
    (zero) queries, and the output drops the rows they add. Later calls take 0 rows of it, so
    they copy no prefix. ONNX shapes may depend on data, torch.export's may not: hence this is
    done here, not in the model."""
    op = opset23
    t, heads, kv_heads = prefix_k.shape[1], q.shape[2] // buffer_k.shape[3], buffer_k.shape[1]
    if t:
        added = op.Mul(op.Constant(value_ints=[t]), first)  # [1]: T rows on a first call, 0 later
        start, axis = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        batch = op.Shape(bias, start=0, end=1)  # from inputs every layer shares: computed once

        def rows(width: int):
            return op.Concat(batch, added, op.Constant(value_ints=[width]), axis=0)

        q = op.Concat(op.CastLike(op.ConstantOfShape(rows(q.shape[2])), q), q, axis=1)
        prefix_rows = rows(prefix_k.shape[2])
        k = op.Concat(op.Expand(op.Slice(prefix_k, start, added, axis), prefix_rows), k, axis=1)
        v = op.Concat(op.Expand(op.Slice(prefix_v, start, added, axis), prefix_rows), v, axis=1)
    bias = op.Expand(bias, bias_shape)  # the same in every layer: ONNX Runtime computes it once
    out, present_k, present_v = GROUP_QUERY_ATTENTION(
        q, k, v, buffer_k, buffer_v, last, total, None, None, None, bias, num_heads=heads, kv_num_heads=kv_heads
    )
    if t:
        out = op.Slice(out, added, op.Constant(value_ints=[1 << 62]), op.Constant(value_ints=[1]))
    return out, present_k, present_v


def _tensor_scatter(buffer, update, start):
    """model.cache_write in ONNX: one TensorScatter along the slot axis, in place in ONNX Runtime
    when past and present share memory."""
    return opset24.TensorScatter(buffer, update, start, axis=2)


@dataclass(frozen=True)
class ExportOptions:
    """What a convert makes, checked when built, so that a family refuses bad options before its
    first export. `cache` "gqa" (the default) writes contract v3: fixed buffers of at most
    `max_length` tokens a sequence, written in place and read by ONNX Runtime's
    GroupQueryAttention; "static" v2 (the same buffers under ONNX's own Attention, which reads the
    whole buffer); "dynamic" v1 (the cache grows by concatenation, for runtimes without the
    in-place ops). `max_length` left unset is the model's context, at most DEFAULT_MAX_LENGTH.
    `genai` adds genai_config.json, so that onnxruntime-genai loads the bundle as it is, and
    declares the buffers' capacity as a number (genai then allocates exactly that). `quantize`
    ("int8" or "int4") turns the linear layers' weights into MatMulNBits blocks after export.
    `opset` (default: the contract's, 23 for v1 and v3, 24 for v2) below 23 writes attention and
    normalisation from primitive ops, for older runtimes: contract v1 only, so an `opset` below
    the default contract's implies `cache` "dynamic" (`note` says so)."""

    dtype: str = "fp32"
    genai: bool = False
    quantize: str | None = None
    opset: int | None = None
    cache: str | None = None
    max_length: int | None = None
    note: str | None = field(default=None, init=False, compare=False)  # why `cache` is not the default

    def __post_init__(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise OutputError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(EXPORT_DTYPES)}")
        if self.quantize is not None and self.quantize not in BITS:
            raise OutputError(f"--quantize {self.quantize!r} is not supported; choose one of {', '.join(BITS)}")
        if self.cache is not None and self.cache not in CACHE_NAMES:
            raise OutputError(f"--cache {self.cache!r} is not supported; choose one of {', '.join(CACHE_NAMES)}")
        if self.dtype == "bf16" and self.quantize:
            raise UsageError(
                "--dtype bf16 does not go with --quantize yet: MatMulNBits over bfloat16 has not been run on a GPU "
                "(ONNX Runtime's CPU provider has no bfloat16 kernels); quantize from fp16 or fp32"
            )
        if self.cache is None:  # frozen: the one place the default is filled in
            default = CACHE_KINDS[CACHE_NAMES[DEFAULT_CACHE]]
            cache = DEFAULT_CACHE
            if self.opset is not None and self.opset < default.opset:
                cache = "dynamic"
                why = f"--opset {self.opset} implies --cache dynamic (--cache {DEFAULT_CACHE} needs {default.opset})"
                object.__setattr__(self, "note", why)
            object.__setattr__(self, "cache", cache)
        kind = self.kind
        fixed = [name for name, version in CACHE_NAMES.items() if CACHE_KINDS[version].in_place]
        if not kind.in_place and self.max_length is not None:
            raise OutputError(f"--max-length goes with --cache {' or '.join(fixed)}, not {self.cache}")
        if self.max_length is not None and self.max_length < 1:
            raise OutputError(f"--max-length {self.max_length} must be at least 1")
        if kind.in_place and self.opset not in (None, kind.opset):
            raise UsageError(f"--cache {self.cache} needs opset {kind.opset}; drop --opset, or add --cache dynamic")
        if not kind.in_place and self.opset is not None and self.opset not in OPSETS:
            raise OutputError(f"--opset {self.opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}")

    @property
    def kind(self) -> CacheKind:
        """The cache contract `cache` names."""
        return CACHE_KINDS[CACHE_NAMES[self.cache]]

    @property
    def graph_opset(self) -> int:
        """The opset written: the one asked for, else the contract's."""
        return self.kind.opset if self.opset is None else self.opset

    def max_length_for(self, config: ModelConfig) -> int | None:
        """The most tokens a sequence may hold in an in-place cache (None for contract v1)."""
        if not self.kind.in_place:
            return None
        return self.max_length or min(config.max_position_embeddings, DEFAULT_MAX_LENGTH)


DEFAULT_OPTIONS = ExportOptions()


def contract_for(config: ModelConfig, options: ExportOptions) -> Contract:
    """The contract a convert writes: `cache` "dynamic" is version 1, "static" version 2, "gqa"
    version 3 (both hold at most `max_length` tokens a sequence and always use the heads layout;
    for genai the graph declares their capacity)."""
    in_place = options.kind.in_place
    return Contract(
        cache_layout="heads" if options.genai or in_place else "rows",
        num_layers=config.num_layers,
        parscale_n=config.parscale_n,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        dtype=CACHE_DTYPES[options.dtype],
        version=CACHE_NAMES[options.cache],
        prefix_slots=config.parscale_n_tokens if in_place else 0,
        max_length=options.max_length_for(config),
        fixed_capacity=in_place and options.genai,
    )


def convert(
    checkpoint_dir: Path,
    out_dir: Path,
    options: ExportOptions = DEFAULT_OPTIONS,
    force: bool = False,
    log: Log = lambda _: None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Export `checkpoint_dir` to a bundle at `out_dir` as `options` say. Raises
    ParScaleExportError subclasses.

    The graph is traced without weights; then every weight streams from the checkpoint into the
    data file (weightwriter.write_data), so memory holds a slice of one tensor, never the model.
    `progress(bytes written, bytes in all)` follows that write."""
    start = time.perf_counter()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    dtype, opset = options.dtype, options.graph_opset
    _check_target(out_dir, checkpoint_dir, force)

    log(f"reading {checkpoint_dir / 'config.json'}")
    config = load_config(checkpoint_dir)
    log(
        f"  P={config.parscale_n} T={config.parscale_n_tokens} layers={config.num_layers} "
        f"heads={config.num_heads}/{config.num_kv_heads} head_dim={config.head_dim} vocab={config.vocab_size}"
    )
    log("checking the checkpoint's tensors (names, shapes, dtypes)")
    checkpoint = Checkpoint(checkpoint_dir, config)
    digest = weights_digest(checkpoint_dir)
    contract = contract_for(config, options)
    tokens = special_tokens(checkpoint_dir)
    if options.genai:
        genai_settings, notes = genai_config(config, contract, tokens)
        for note in notes:
            log(f"note: {note}")

    with _staging_dir(out_dir) as staging:
        log(f"tracing and exporting to ONNX without weights (opset {opset}, {dtype})")
        proto, recipes = _export_onnx(config, checkpoint, contract, opset, EXPORT_DTYPES[dtype], log)
        quantization = None
        if options.quantize:
            log(f"quantizing linear weights to {options.quantize} (MatMulNBits) as they are written")
            quantization = quantize_graph(proto, options.quantize, recipes)
        size = sum(nbytes(recipes[t.name]) for t in proto.graph.initializer if t.name in recipes)
        log(f"loading weights into {DATA_FILE} ({size / 2**30:.2f} GiB), a band of rows at a time")
        write_data(proto.graph, recipes, checkpoint, staging / DATA_FILE, progress)
        onnx.save(proto, str(staging / MODEL_FILE))
        del proto
        log("checking the ONNX model")
        try:
            onnx.checker.check_model(str(staging / MODEL_FILE))
        except onnx.checker.ValidationError as exc:
            raise BundleError(f"exported graph failed onnx.checker: {exc}") from None
        log("writing manifest and copying checkpoint metadata")
        for name in COPIED_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copyfile(checkpoint_dir / name, staging / name)
        manifest = _manifest(config, contract, dtype, opset, checkpoint_dir, digest, tokens, quantization)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if options.genai:
            (staging / GENAI_CONFIG).write_text(json.dumps(genai_settings, indent=2) + "\n", encoding="utf-8")
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        _move_into_place(staging, out_dir)
    return ConvertResult(out_dir=out_dir, files=files, seconds=time.perf_counter() - start, config=config)


def _export_onnx(
    config: ModelConfig, checkpoint: Checkpoint, contract: Contract, opset: int, dtype: torch.dtype, log: Log
) -> tuple[onnx.ModelProto, dict[str, Plain]]:
    """Trace the model without weights (its parameters are fake tensors: shapes and dtypes, no
    storage) and optimize the graph as torch.onnx's own optimizer would, except that no node
    reading a weight is folded: a Transpose or Reshape of a weight becomes part of that weight's
    recipe instead (_fold_weight_views). Returns the graph, whose weight initializers are
    placeholders, and the recipe of each."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a fake module cannot be cast afterwards (its parameters cannot be swapped)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            lm = ParScaleForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    lm.model.rotary_emb = RotaryEmbedding(config)  # computed from the config, real: a constant of the graph
    lm.eval().requires_grad_(False)
    batch, seq, past = TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST
    # Traced with a small buffer even where the graph declares its capacity (_declare_shapes).
    length = contract.prefix_slots + past + seq + 2 if contract.cache.in_place else past
    cache = tuple(torch.zeros(contract.cache_shape(batch, length), dtype=dtype) for _ in contract.past_names())
    args = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq),
        cache,
    )
    b = Dim(BATCH, min=1, max=1 << 16)
    s = Dim(SEQUENCE, min=1, max=1 << 20)
    p = Dim(contract.cache.past_axis, min=0 if not contract.cache.in_place else 2, max=1 << 20)
    t = Dim(TOTAL, min=1, max=1 << 21)
    rows = b * config.parscale_n if config.parscale_n > 1 and contract.cache_layout == "rows" else b
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: rows, 2: p} for _ in cache),
    }
    with _quiet_exporter(log):
        program = torch.onnx.export(
            ExportGraph(lm, contract).eval(),
            args,
            dynamo=True,
            optimize=False,  # the optimizer's folding would read the (fake) weights: done below
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=contract.input_names(),
            output_names=contract.output_names(),
            custom_translation_table={
                torch.ops.parscale.cache_write.default: _tensor_scatter,
                torch.ops.parscale.rope.default: _rotary if opset >= 23 else _rotary_decomposed,
                torch.ops.parscale.add_rms_norm.default: _add_rms_norm if opset >= 23 else _add_rms_norm_decomposed,
                torch.ops.parscale.rope_heads_last.default: _rotary_heads_last,
                torch.ops.parscale.group_query_attention.default: _group_query_attention,
            },
        )
    model = program.model
    del program, lm
    log("  optimizing the graph (weights stay recipes)")
    recipes = _weight_recipes(model, config, checkpoint, dtype)
    _fold_weight_views(model, checkpoint, recipes)
    with _quiet_exporter(log):
        onnxscript.optimizer.optimize_ir(
            model, should_fold=lambda node: False if any(v in recipes for v in node.inputs) else None
        )
        onnx_fusions.fuse(model)  # what torch.onnx's own optimize step runs after optimize_ir
    _fold_weight_views(model, checkpoint, recipes)  # Reshapes whose shape only folding made constant
    ir.passes.common.RemoveUnusedNodesPass()(model)
    _fuse_norms(model)
    by_name = {}
    for value in model.graph.initializers.values():
        if (recipe := recipes.get(value)) is not None:
            by_name[value.name] = recipe
            value.const_value = ir.ExternalTensor(DATA_FILE, 0, nbytes(recipe), ir.DataType(recipe.dtype),
                                                  shape=ir.Shape(recipe.shape), name=value.name)  # fmt: skip
    proto = ir.serde.serialize_model(model)
    _finish_proto(proto, opset, contract)
    return proto, by_name


def _weight_recipes(model: ir.Model, config: ModelConfig, checkpoint: Checkpoint, dtype: torch.dtype) -> dict:
    """Give every weight initializer of the traced graph (named as the module's state_dict, so
    `lm.` + a checkpoint name, or a stacked projection) a recipe, and a lazy value that reads it:
    the optimizer may read a small one (it compares initializers of up to 1024 elements), never
    a large one (it folds no node that reads a weight). Returns the recipes by value (a dict
    that holds the values: a value the optimizer drops is never mistaken for a new one)."""
    stacked = stacked_names(config.num_layers)
    if config.tie_word_embeddings:  # the tied pair is traced once, under the head's name
        stacked["lm_head.weight"] = ["model.embed_tokens.weight"]
    recipes = {}
    for name, value in model.graph.initializers.items():
        key = name.removeprefix("lm.")
        parts = stacked.get(key, [key])
        if not all(part in checkpoint.shapes for part in parts):
            if value.const_value is None or isinstance(getattr(value.const_value, "raw", None), FakeTensor):
                raise BundleError(f"traced initializer {name!r} is neither a checkpoint tensor nor a constant")
            continue  # a real constant of the graph (the rotary frequencies)
        stack = Stack(tuple(parts), tuple(checkpoint.shapes[p] for p in parts), dtype)
        recipe = Plain(stack, stack.shape)
        if tuple(value.shape) != recipe.shape:
            raise BundleError(f"traced initializer {name!r} has shape {value.shape}, the checkpoint {recipe.shape}")
        _attach(value, recipe, checkpoint, recipes)
    return recipes


def _attach(value: ir.Value, recipe: Plain, checkpoint: Checkpoint, recipes: dict) -> None:
    value.const_value = ir.LazyTensor(
        lambda: _evaluate(recipe, checkpoint), dtype=ir.DataType(recipe.dtype), shape=ir.Shape(recipe.shape)
    )
    recipes[value] = recipe


def _evaluate(recipe: Plain, checkpoint: Checkpoint) -> ir.Tensor:
    """A recipe's whole tensor in memory (only ever asked for small ones)."""
    tensor = recipe.stack.rows(checkpoint, 0, recipe.stack.shape[0])
    if recipe.perm is not None:
        tensor = tensor.permute(recipe.perm)
    tensor = tensor.contiguous().reshape(recipe.shape)
    if tensor.dtype == torch.bfloat16:
        return ir.Tensor(tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return ir.Tensor(tensor.numpy())


def _fold_weight_views(model: ir.Model, checkpoint: Checkpoint, recipes: dict) -> None:
    """A Transpose or constant-shaped Reshape that is a weight's only reader becomes part of the
    weight's recipe (the weight written transposed, or under its new shape), as torch.onnx's
    optimizer would fold it into a new initializer. The folded weight keeps its name. A weight
    with several readers (an embedding that is also the tied head) keeps its Transpose, as the
    optimizer keeps it for large weights: ONNX Runtime folds it when the session starts."""
    graph, folded = model.graph, True
    while folded:
        folded = False
        for node in list(graph):
            data = node.inputs[0] if node.inputs else None
            if node.domain not in ("", "ai.onnx") or data not in recipes or len(data.uses()) != 1:
                continue
            recipe = recipes[data]
            try:
                if node.op_type == "Transpose":
                    perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(len(recipe.shape))))
                    recipe = recipe.transposed(tuple(perm))
                elif node.op_type == "Reshape" and (shape := ir.convenience.get_const_tensor(node.inputs[1])):
                    recipe = recipe.reshaped(_reshaped(recipe.shape, shape.numpy().tolist(), node))
                else:
                    continue
            except ValueError:
                continue
            name, out = data.name, node.outputs[0]
            weight = ir.Value(shape=ir.Shape(recipe.shape), type=ir.TensorType(ir.DataType(recipe.dtype)))
            out.replace_all_uses_with(weight)
            graph.remove(node, safe=True)
            graph.initializers.pop(name)
            del recipes[data]
            weight.name = name
            _attach(weight, recipe, checkpoint, recipes)
            graph.register_initializer(weight)
            folded = True


def _reshaped(shape: tuple[int, ...], target: list[int], node: ir.Node) -> tuple[int, ...]:
    """ONNX Reshape's output shape: 0 copies the input's dimension (unless allowzero), -1 is inferred."""
    allowzero = node.attributes.get_int("allowzero", 0)
    out = [shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(shape) // known if known else 0
    if math.prod(out) != math.prod(shape):
        raise ValueError(f"cannot reshape {shape} to {target}")
    return tuple(out)


def _fuse_norms(model) -> None:
    """onnxscript fuses RMSNorm into ONNX RMSNormalization only in opset-23 models (so only for
    contract v1); the op is unchanged in opset 24, so let v2's graph have it too (17 fused ops per
    mid-size step instead of 85 small ones)."""
    opset = model.opset_imports[""]
    if opset > 23:
        model.opset_imports[""] = 23
        try:
            onnx_fusions.fuse(model)
        finally:
            model.opset_imports[""] = opset


def _finish_proto(proto: onnx.ModelProto, opset: int, contract: Contract) -> None:
    """Check the opset, declare the oldest IR version it needs and the contract's fixed axes, drop
    per-node stack traces.

    The exporter writes IR version 10 whatever the opset; runtimes refuse IR versions newer than
    they know, so an opset-18 graph declares IR 8 (nothing in it needs more). The stack traces
    embed absolute source paths, which would make two converts from different checkouts differ,
    and they are half the file."""
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise BundleError(f"torch.onnx wrote opset {written}, not the {opset} asked for")
    standard = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]  # onnx knows no contrib domain
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(standard))
    for node in proto.graph.node:
        del node.metadata_props[:]
    _declare_shapes(proto.graph, contract)


def _declare_shapes(graph: onnx.GraphProto, contract: Contract) -> None:
    """Write the contract's numeric axes into the graph's inputs and outputs. The trace declares
    a buffer's capacity as an axis; a contract that fixes it (genai bundles) says the number, which
    ONNX Runtime then checks at every call and onnxruntime-genai reads to size its buffer."""
    spec = contract.input_spec() | contract.output_spec()
    for value in (*graph.input, *graph.output):
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec[value.name][1], strict=True):
            if isinstance(axis, int) and dim.dim_value != axis:
                dim.Clear()
                dim.dim_value = axis


def _manifest(
    config: ModelConfig,
    contract: Contract,
    dtype: str,
    opset: int,
    checkpoint_dir: Path,
    digest: str,
    tokens: dict,
    quantization: dict | None,
) -> dict:
    return {
        "format": FORMAT,
        "contract": contract.to_dict(),
        "model": {
            "parscale_n": config.parscale_n,
            "parscale_n_tokens": config.parscale_n_tokens,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings,
            "rope_type": config.rope_type,
        },
        "dtype": dtype,
        "opset": opset,
        "tokens": tokens,
        "quantization": quantization,
        "files": {"model": MODEL_FILE, "external_data": DATA_FILE},
        "source": {"checkpoint": str(checkpoint_dir.resolve()), "weights": digest},
        "versions": {
            "parscale_export": __version__,
            "python": platform.python_version(),
            **package_versions("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime"),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _check_target(out_dir: Path, checkpoint_dir: Path, force: bool) -> None:
    target, source = out_dir.resolve(), checkpoint_dir.resolve()
    if target == source or target in source.parents:
        raise OutputError(f"{out_dir}: is or contains the checkpoint {checkpoint_dir}; choose another output")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{out_dir}: directory is not empty; pass --force to replace it")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir`, removed on any failure or interrupt."""
    parent = out_dir.resolve().parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write beside it ({exc.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle should look like any directory
    try:
        yield staging
    except OSError as exc:  # a full disk, a vanished directory: the user's problem to fix, not a bug
        raise OutputError(f"{out_dir}: writing the bundle failed ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished bundle to `out_dir`; an old one (allowed by --force) goes only after."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
        try:
            staging.rename(out_dir)
        except BaseException:  # even Ctrl-C here: put the old bundle back
            old.rename(out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)


class _StepRelay(io.TextIOBase):
    """Turns the exporter's own step lines ("[torch.onnx] Run decompositions...") into our
    progress log, so a minutes-long export of a large model does not look hung."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text  # print() arrives in pieces: gather whole lines
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith("[torch.onnx]") and not line.rstrip().endswith("✅"):
                self.log("  " + line.removeprefix("[torch.onnx] ").rstrip(". "))
        return len(text)


@contextmanager
def _quiet_exporter(log: Log) -> Iterator[None]:
    """The exporter warns about things that do not concern our graph (torchvision, axis renames);
    its step lines become progress."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), redirect_stdout(_StepRelay(log)):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
