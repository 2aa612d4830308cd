"""validate passes a correct bundle, fails drifted ones (exit 1), and refuses what it cannot do (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import (
    CONFORMANCE,
    STATIC_MAX_LENGTH,
    TINY,
    drifted_copy,
    edit_weights,
    move_one_aggregation_bias,
    scale_one_prefix,
    swap_streams,
)
from parscale_export.cli.main import main

from parscale_export.runtime import cuda_available
from parscale_export.synthetic import parscale_config, write_family


def test_correct_bundle_passes_on_cpu_and_says_so(bundle, tmp_path, capsys) -> None:
    report = tmp_path / "report.json"
    assert main(["validate", str(bundle(TINY)), "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    if not cuda_available():
        assert "runs on ONNX Runtime's CPU provider" in err and "PASS on CPU" in out
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and data["provider"] in ("cpu", "cuda")
    assert {p["name"] for p in data["phases"]} == {"prefill", "decode", "chunked-prefill", "batch-1"}
    assert all(p["max_abs"] < 1e-4 and p["top1"] == 1.0 for p in data["phases"])
    assert data["versions"]["torch"] and data["device"] and data["thresholds"]["max_abs"] == 1e-3


@pytest.mark.parametrize("cache", ["dynamic", "static", "gqa"])
def test_p1_and_sharded_bf16_bundles_pass(cache: str, bundle) -> None:
    for name in ("p1_plain_mqa", "p2_gqa_bf16_sharded"):
        assert main(["validate", str(bundle(CONFORMANCE / name, cache=cache)), "--provider", "cpu"]) == 0


def test_static_cache_bundle_passes(bundle, tmp_path) -> None:
    report = tmp_path / "report.json"
    assert main(["validate", str(bundle(TINY, cache="static")), "--provider", "cpu", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and not data["contract_problems"]
    assert all(p["max_abs"] < 1e-4 and p["top1"] == 1.0 for p in data["phases"])


# Every graph layout convert writes, as its flags: validate must fail each one drifted.
LAYOUTS = {
    "v1": [],
    "v1-fp16": ["--dtype", "fp16"],
    "v1-genai": ["--genai", "--cache", "dynamic"],  # the "heads" cache layout
    "v1-opset18": ["--opset", "18"],  # attention and norms from primitive ops
    "v2": ["--cache", "static", "--max-length", str(STATIC_MAX_LENGTH)],
    "v3-genai": ["--genai"],  # contract v3, --genai's default
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_passes_undrifted(layout: str, tmp_path) -> None:
    """What makes the drift test below mean something: the same layout, converted from the true
    checkpoint, passes."""
    assert main(["convert", str(TINY), "-o", str(tmp_path / "bundle"), *LAYOUTS[layout]]) == 0
    assert main(["validate", str(tmp_path / "bundle")]) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("change", [scale_one_prefix, move_one_aggregation_bias, swap_streams])
def test_drifted_weights_fail_with_exit_1(change, layout: str, tmp_path, capsys) -> None:
    drifted = drifted_copy(tmp_path, change.__name__, change)
    report = tmp_path / "report.json"
    path = tmp_path / "bundle"
    assert main(["convert", str(drifted), "-o", str(path), *LAYOUTS[layout]]) == 0
    code = main(["validate", str(path), "--checkpoint", str(TINY), "--report", str(report)])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "FAIL" in out and "validation failed" in err
    assert json.loads(report.read_text())["verdict"] == "fail"


def test_a_drifted_member_of_a_family_fails_and_the_others_pass(tmp_path, capsys) -> None:
    """A family bundle is validated P by P: the member converted from a drifted checkpoint fails
    against its true one, the member that shares only the backbone with it still passes."""
    family = write_family(tmp_path / "true", parscale_config(parscale_n_tokens=8), (1, 2), seed=4)
    drifted = [tmp_path / "drifted" / path.name for path in family]
    for source, copy in zip(family, drifted, strict=True):
        shutil.copytree(source, copy)
    edit_weights(drifted[1], lambda t: t["model.layers.1.self_attn.prefix_k"][1].mul_(1.5))  # stream 1 of 2
    out = tmp_path / "family"
    assert main(["convert", *map(str, drifted), "-o", str(out)]) == 0
    args = ["validate", str(out), "--decode-steps", "2", "--parallel"]
    assert main([*args, "2", "--checkpoint", str(family[1])]) == 1
    assert main([*args, "1", "--checkpoint", str(family[0])]) == 0
    assert "validation failed" in capsys.readouterr().err


def test_tolerance_override_is_honoured(bundle, capsys) -> None:
    assert main(["validate", str(bundle(TINY)), "--provider", "cpu", "--atol", "1e-12"]) == 1
    assert "max |error|" in capsys.readouterr().err


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(bundle, capsys) -> None:
    assert main(["validate", str(bundle(TINY)), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "Traceback" not in err


def test_corrupt_model_is_a_clear_error(bundle, tmp_path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle(TINY), broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    assert main(["validate", str(broken), "--provider", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "Traceback" not in err


def test_checkpoint_of_another_shape_is_refused(bundle, capsys) -> None:
    assert main(["validate", str(bundle(TINY)), "--checkpoint", str(CONFORMANCE / "p2_gqa_bf16_sharded")]) == 2
    assert "disagree on parscale_n" in capsys.readouterr().err


def test_not_a_bundle(tmp_path, capsys) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


@pytest.mark.cuda
def test_fp16_bundle_passes_on_cuda(bundle) -> None:
    assert main(["validate", str(bundle(TINY, "fp16")), "--provider", "cuda"]) == 0


def test_device_values_are_described_without_copying() -> None:
    import numpy as np
    import onnxruntime as ort

    from parscale_export.validate import _Described

    value = _Described(ort.OrtValue.ortvalue_from_numpy(np.zeros((8, 2, 5, 16), np.float16)))
    assert value.shape == (8, 2, 5, 16) and value.dtype == "float16"
