"""bf16 bundles: the checkpoints' own dtype, for CUDA. ONNX Runtime's CPU provider has no
bfloat16 kernels, so on this CPU the graph itself is run by ONNX's reference evaluator (the
spec's semantics, in numpy) and judged by validate's own phases and bf16 thresholds."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import TINY, drifted_copy, move_one_aggregation_bias, scale_one_prefix, swap_streams
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from parscale_export.cli.main import main

from parscale_export.bundle import read_manifest
from parscale_export.reference import Reference
from parscale_export.runtime import Runtime, cuda_available
from parscale_export.stepping import Stepper, positions
from parscale_export.validate import DEFAULT_THRESHOLDS, Settings, compare


class SkipSimplifiedLayerNormalization(OpRun):
    """ONNX Runtime's fused residual add + RMSNorm (com.microsoft), which onnx's evaluator does not
    know: out = (x + skip) / sqrt(mean((x + skip)^2) + epsilon) * gamma, in float32; the sum is
    the fourth output."""

    op_domain = "com.microsoft"

    def _run(self, x, skip, gamma, epsilon=None):
        total = (x.astype(np.float32) + skip.astype(np.float32)).astype(x.dtype)
        t32 = total.astype(np.float32)
        inv_std = 1 / np.sqrt(np.mean(t32 * t32, axis=-1, keepdims=True) + epsilon)
        out = (t32 * inv_std * gamma.astype(np.float32)).astype(x.dtype)
        return out, np.zeros_like(inv_std), inv_std, total


class GroupQueryAttention(OpRun):
    """ONNX Runtime's GroupQueryAttention (com.microsoft) as contract v3 uses it, which onnx's
    evaluator does not know, from its documented semantics: past and present share one buffer
    [B, KV, capacity, D]; row b's S new keys go to slots (seqlens_k[b] - S, seqlens_k[b]]; query i
    sees slots up to its own, plus `attention_bias` over the first total_sequence_length slots;
    query head h reads key/value head h // (num_heads / kv_num_heads); float32 softmax."""

    op_domain = "com.microsoft"

    def _run(self, query, key, value, past_key, past_value, seqlens_k, total, *optional, num_heads, kv_num_heads):
        bias = optional[3]  # after cos_cache, sin_cache and position_ids, which v3 leaves empty
        batch, seq, _ = query.shape
        d = past_key.shape[3]
        present_k, present_v = past_key.copy(), past_value.copy()
        out = np.zeros((batch, seq, num_heads, d), np.float32)
        total = int(total)
        for b in range(batch):
            last = int(seqlens_k[b])
            new = slice(last + 1 - seq, last + 1)
            present_k[b, :, new] = key[b].reshape(seq, kv_num_heads, d).transpose(1, 0, 2)
            present_v[b, :, new] = value[b].reshape(seq, kv_num_heads, d).transpose(1, 0, 2)
            keys, values = present_k[b, :, :total].astype(np.float32), present_v[b, :, :total].astype(np.float32)
            q = query[b].astype(np.float32).reshape(seq, num_heads, d)
            causal = np.where(np.arange(total)[None] <= np.arange(last + 1 - seq, last + 1)[:, None], 0.0, -np.inf)
            for h in range(num_heads):
                kv = h // (num_heads // kv_num_heads)
                scores = q[:, h] @ keys[kv].T / np.sqrt(d) + causal + bias[b, 0].astype(np.float32)
                weights = np.exp(scores - scores.max(-1, keepdims=True))
                out[b, :, h] = (weights / weights.sum(-1, keepdims=True)) @ values[kv]
        return out.reshape(batch, seq, -1).astype(query.dtype), present_k, present_v


class SpecEvaluator(Stepper):
    """A bundle run by onnx.reference.ReferenceEvaluator: slow, exact to the ONNX spec (and, for
    the ONNX Runtime contrib ops our graphs use, to their documented formulas), any dtype."""

    def __init__(self, bundle_dir) -> None:
        manifest = read_manifest(bundle_dir)
        self.contract = manifest.contract
        contrib = [SkipSimplifiedLayerNormalization, GroupQueryAttention]
        self.session = ReferenceEvaluator(str(manifest.model_path), new_ops=contrib)

    def run(self, input_ids, attention_mask, past):
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions(attention_mask, input_ids.shape[1]),
        } | dict(zip(self.contract.past_names(), past, strict=True))
        logits, *present = self.session.run(self.contract.output_names(), feeds)
        return np.asarray(logits, np.float32), present

    def empty_past(self, batch, tokens=None):
        shape = self.contract.cache_shape(batch, self.contract.cache_slots(tokens))
        dtype = ml_dtypes.bfloat16 if self.contract.dtype == "bfloat16" else self.contract.np_dtype
        return [np.zeros(shape, dtype) for _ in self.contract.past_names()]


def judge(bundle_dir, checkpoint=TINY):
    engine = SpecEvaluator(bundle_dir)
    reference = Reference.from_checkpoint(checkpoint)
    return compare(engine, reference, engine.contract.vocab_size, Settings(), DEFAULT_THRESHOLDS["bfloat16"])


def test_bf16_bundle_declares_bfloat16_weights_and_cache(bundle) -> None:
    path = bundle(TINY, "bf16")
    manifest = read_manifest(path)
    assert manifest.raw["dtype"] == "bf16" and manifest.contract.dtype == "bfloat16"
    model = onnx.load(str(manifest.model_path), load_external_data=False)
    bf16 = onnx.TensorProto.BFLOAT16
    caches = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert caches and all(i.type.tensor_type.elem_type == bf16 for i in caches)
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1]
    assert weights and all(t.data_type == bf16 for t in weights)


def test_the_evaluators_contrib_ops_agree_with_onnx_runtime(bundle) -> None:
    """What makes the evaluator's judgement of bf16 graphs mean something: on the fp32 graph of the
    default contract its two contrib ops give ONNX Runtime's logits, step by step."""
    path = bundle(TINY)
    engines = SpecEvaluator(path), Runtime(path)
    ids, mask = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]]), np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    (spec, spec_state), (ort, ort_state) = (engine.prefill(ids, mask, reserve=3) for engine in engines)
    np.testing.assert_allclose(spec, ort, atol=2e-5)
    for token in (11, 12, 13):
        spec, spec_state = engines[0].extend(np.array([[token], [token]]), spec_state)
        ort, ort_state = engines[1].extend(np.array([[token], [token]]), ort_state)
        np.testing.assert_allclose(spec, ort, atol=2e-5)


def test_bf16_graph_matches_the_reference_under_the_spec_evaluator(bundle) -> None:
    phases = judge(bundle(TINY, "bf16"))
    assert [p.name for p in phases] == ["prefill", "decode", "chunked-prefill", "batch-1"]
    assert all(p.passed for p in phases), [p.failures for p in phases]
    assert max(p.max_abs for p in phases) > 1e-4  # really bfloat16 arithmetic, not float32 in disguise


@pytest.mark.parametrize("change", [scale_one_prefix, move_one_aggregation_bias, swap_streams])
def test_drifted_bf16_bundles_fail_the_bf16_thresholds(change, bundle, tmp_path) -> None:
    phases = judge(bundle(drifted_copy(tmp_path, change.__name__, change), "bf16"))
    assert not all(p.passed for p in phases)


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_bf16_on_cpu_is_refused_with_the_reason(bundle, capsys) -> None:
    for command in (["validate"], ["generate", "--input-ids", "1 2 3"]):
        assert main([command[0], str(bundle(TINY, "bf16")), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "bfloat16 bundle runs on CUDA only" in err and "Traceback" not in err


def test_bf16_with_quantize_is_refused(tmp_path, capsys) -> None:
    assert main(["convert", str(TINY), "-o", str(tmp_path / "out"), "--dtype", "bf16", "--quantize", "int4"]) == 2
    assert "--dtype bf16" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [[], ["--genai"], ["--cache", "static"]])
def test_bf16_takes_the_in_place_layouts(extra, tmp_path) -> None:
    """The default contract (v3), its genai form and v2 convert in bfloat16; they run on CUDA only
    (validate refuses them here, below, and gpu_check.sh validates the default one on a GPU)."""
    out = tmp_path / "out"
    assert main(["convert", str(TINY), "-o", str(out), "--dtype", "bf16", *extra]) == 0
    contract = json.loads((out / "manifest.json").read_text())["contract"]
    assert contract["dtype"] == "bfloat16" and contract["version"] in (2, 3)
    assert main(["validate", str(out), "--provider", "cpu"]) == 2


@pytest.mark.cuda
def test_bf16_bundle_passes_on_cuda(bundle) -> None:
    assert main(["validate", str(bundle(TINY, "bf16")), "--provider", "cuda"]) == 0
