"""Client conformance, old onnxruntime: `convert --opset 18` (which implies --cache dynamic) writes
primitive ops, declares the IR version it needs, and matches the official outputs both here and in
onnxruntime 1.15.0, the oldest runtime the README names, driven with plain session.run as the
README's contract-v1 block does (scripts/ort_conformance.py). 1.15 refuses the default bundle.
(genai's heads layout at opset 18 is not for it: 1.15 cannot reshape its empty first past, and
genai brings its own onnxruntime anyway.)

The old runtime lives in a virtual environment of its own; `make test` creates it and names its
Python in PARSCALE_OLD_ORT_PYTHON (scripts/ort_conformance.py needs only onnxruntime and numpy).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CONFORMANCE, CONFORMANCE_NAMES, ROOT, TINY, official
from parscale_export.cli.main import main

from parscale_export.config import load_config
from parscale_export.runtime import Runtime

OLD_PYTHON = os.environ.get("PARSCALE_OLD_ORT_PYTHON")
OLD_VERSION = "1.15.0"
needs_old_runtime = pytest.mark.skipif(not OLD_PYTHON, reason="PARSCALE_OLD_ORT_PYTHON not set (make test sets it)")


@pytest.fixture(scope="module")
def opset18(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opset18")
    made = {}
    for name in CONFORMANCE_NAMES:
        assert main(["convert", str(CONFORMANCE / name), "-o", str(root / name), "--opset", "18"]) == 0
        made[name] = root / name
    return made


def test_opset_18_implies_contract_v1_and_says_so(opset18: dict[str, Path], tmp_path, capsys) -> None:
    assert all(json.loads((p / "manifest.json").read_text())["contract"]["version"] == 1 for p in opset18.values())
    assert main(["convert", str(CONFORMANCE / "p1_plain_mqa"), "-o", str(tmp_path / "b"), "--opset", "20"]) == 0
    assert "cache=dynamic (contract v1): --opset 20 implies --cache dynamic" in capsys.readouterr().out
    for cache in ("gqa", "static"):
        args = ["convert", str(CONFORMANCE / "p1_plain_mqa"), "-o", str(tmp_path / cache), "--opset", "18"]
        assert main([*args, "--cache", cache]) == 2
        assert "add --cache dynamic" in capsys.readouterr().err and not (tmp_path / cache).exists()


def on_old_runtime(bundle: Path, name: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "ort_conformance.py"
    reference = CONFORMANCE / name / "reference.npz"
    return subprocess.run([OLD_PYTHON, str(script), str(bundle), str(reference)], capture_output=True, text=True)


def test_opset_18_graph_is_primitive_and_declares_ir_8(opset18: dict[str, Path]) -> None:
    path = opset18["p2_gqa_bf16_sharded"]
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert proto.ir_version == 8
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert "Attention" not in ops and "RMSNormalization" not in ops and "RotaryEmbedding" not in ops
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # no ONNX Runtime contrib op
    assert ops["Softmax"] and ops["MatMul"] and ops["ReduceMean"]
    assert json.loads((path / "manifest.json").read_text())["opset"] == 18


@pytest.mark.parametrize(("cache", "attention"), [("gqa", "GroupQueryAttention"), ("dynamic", "Attention")])
def test_opset_23_graph_uses_the_fused_ops(cache: str, attention: str, bundle) -> None:
    """One RotaryEmbedding per q and k, one fused residual add + norm per norm but the first, one
    attention node per layer: what 1.15 cannot run."""
    proto = onnx.load(str(bundle(TINY, cache=cache) / "model.onnx"), load_external_data=False)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    layers = load_config(TINY).num_layers
    assert ops["RotaryEmbedding"] == 2 * layers and ops[attention] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["RMSNormalization"] == 1
    assert "Neg" not in ops  # rotate-half spelled out would need it


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_opset_18_matches_official_here(name: str, opset18: dict[str, Path]) -> None:
    ref = official(name)
    logits, _ = Runtime(opset18[name]).prefill(ref["input_ids"], ref["attention_mask"])
    real = ref["attention_mask"].astype(bool)
    assert np.abs(logits - ref["prefill_logits"])[real].max() < 1e-4


@needs_old_runtime
@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_opset_18_matches_official_on_the_oldest_runtime(name: str, opset18: dict[str, Path]) -> None:
    done = on_old_runtime(opset18[name], name)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["onnxruntime"] == OLD_VERSION
    assert result["max_error"] < 1e-4, result
    assert result["greedy_tokens_agree"], result


@needs_old_runtime
@pytest.mark.parametrize("cache", ["gqa", "dynamic"])  # the default, and v1 at its default opset 23
def test_the_default_opset_needs_a_newer_runtime(cache: str, bundle) -> None:
    done = on_old_runtime(bundle(CONFORMANCE / "p1_plain_mqa", cache=cache), "p1_plain_mqa")
    assert done.returncode != 0
    assert "Unsupported model IR version" in done.stderr or "opset" in done.stderr.lower(), done.stderr[-500:]


def test_unsupported_opsets_are_refused(tmp_path: Path, capsys) -> None:
    for opset in ("17", "24"):
        assert main(["convert", str(CONFORMANCE / "p1_plain_mqa"), "-o", str(tmp_path / opset), "--opset", opset]) == 2
        assert not (tmp_path / opset).exists()
