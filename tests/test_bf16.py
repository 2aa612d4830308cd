"""bf16 bundles: the checkpoints' own dtype, for CUDA. ONNX Runtime's CPU provider has no
bfloat16 kernels, so on this CPU the graph itself is run by ONNX's reference evaluator (the
spec's semantics, in numpy) and judged by validate's own phases and bf16 thresholds."""

from __future__ import annotations

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
from parscale_export.runtime import cuda_available
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


class SpecEvaluator(Stepper):
    """A bundle run by onnx.reference.ReferenceEvaluator: slow, exact to the ONNX spec (and, for
    the one ONNX Runtime contrib op our graphs use, to its documented formula), any dtype."""

    def __init__(self, bundle_dir) -> None:
        manifest = read_manifest(bundle_dir)
        self.contract = manifest.contract
        self.session = ReferenceEvaluator(str(manifest.model_path), new_ops=[SkipSimplifiedLayerNormalization])

    def run(self, input_ids, attention_mask, past):
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions(attention_mask, input_ids.shape[1]),
        } | dict(zip(self.contract.past_names(), past, strict=True))
        logits, *present = self.session.run(self.contract.output_names(), feeds)
        return np.asarray(logits, np.float32), present

    def empty_past(self, batch, tokens=None):  # contract v1: a zero-length past whatever the length
        return [np.zeros(self.contract.cache_shape(batch, 0), ml_dtypes.bfloat16) for _ in self.contract.past_names()]


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


@pytest.mark.parametrize("extra", [["--quantize", "int4"], ["--genai"]])
def test_bf16_with_quantize_or_genai_is_refused(extra, tmp_path, capsys) -> None:
    assert main(["convert", str(TINY), "-o", str(tmp_path / "out"), "--dtype", "bf16", *extra]) == 2
    assert "--dtype bf16" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.cuda
def test_bf16_bundle_passes_on_cuda(bundle) -> None:
    assert main(["validate", str(bundle(TINY, "bf16")), "--provider", "cuda"]) == 0
