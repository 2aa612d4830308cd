"""Client conformance, our own CLI: `generate` and `validate` take every layout `convert` writes
(P=1 and P=4), as the README's commands use them: generate gives the official greedy tokens for
the official prompts, validate passes (and validate's failing on drifted bundles of each layout
is tests/test_validate.py's)."""

from __future__ import annotations

import json

import pytest
from conftest import CONFORMANCE, TRAINED, official
from parscale_export.cli.main import main

# Every layout the CLI writes, as convert's flags; [] is the default (contract v3).
LAYOUTS = {
    "default": [],
    "default-fp16": ["--dtype", "fp16"],
    "genai": ["--genai"],
    "static": ["--cache", "static"],
    "dynamic": ["--cache", "dynamic"],
    "dynamic-genai": ["--cache", "dynamic", "--genai"],
    "opset18": ["--opset", "18"],
}
CHECKPOINTS = {1: "p1_plain_mqa", 4: "p4_mha_tied_nosmooth"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 4])
def test_generate_and_validate_take_every_layout(n: int, layout: str, tmp_path, capsys) -> None:
    name = CHECKPOINTS[n]
    out = tmp_path / "bundle"
    assert main(["convert", str(CONFORMANCE / name), "-o", str(out), *LAYOUTS[layout]]) == 0
    assert main(["validate", str(out), "--provider", "cpu"]) == 0
    ref = official(name)
    steps = ref["step_tokens"].shape[1]
    capsys.readouterr()
    for row in range(len(ref["input_ids"])):
        ids = ref["input_ids"][row][ref["attention_mask"][row] == 1]
        args = ["generate", str(out), "--input-ids", " ".join(map(str, ids)), "-n", str(steps), "--json"]
        assert main([*args, "--provider", "cpu"]) == 0
        tokens = json.loads(capsys.readouterr().out)["tokens"]
        assert tokens == ref["step_tokens"][row].tolist()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_default_bundles_take_generate_and_validate(scheme: str, tmp_path, capsys) -> None:
    """On trained weights (random ones sit too close to quantization's thresholds): validate
    passes, its exact phases included, and generate runs to length."""
    out = tmp_path / "bundle"
    assert main(["convert", str(TRAINED), "-o", str(out), "--quantize", scheme]) == 0
    assert json.loads((out / "manifest.json").read_text())["contract"]["version"] == 3
    assert main(["validate", str(out), "--provider", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--input-ids", "100 101 102", "-n", "8", "--json", "--provider", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) >= 1
