"""scripts/train_tiny.py: a few steps learn something, repeat exactly, and give a checkpoint
that converts and validates. The full run that made fixtures/tiny-python-p4 is in its README."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from parscale_export.cli.main import main

QUICK = ["--steps", "30", "--corpus-bytes", "150000", "--vocab", "384"]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """The same quick command twice, into two directories."""
    outs = [tmp_path_factory.mktemp("train") / name for name in ("a", "b")]
    for out in outs:
        script = ROOT / "scripts" / "train_tiny.py"
        subprocess.run([sys.executable, str(script), "--out", str(out), *QUICK], check=True, capture_output=True)
    return outs


def test_loss_falls(quick_runs) -> None:
    curve = json.loads((quick_runs[0] / "train_log.json").read_text())["loss_curve"]
    first, last = curve[0]["loss"], curve[-1]["loss"]
    assert first > 5.5, curve  # about ln(384) = 5.95 at the start
    assert last < first - 0.7, curve


def test_training_is_deterministic(quick_runs) -> None:
    a, b = quick_runs
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_checkpoint_converts_and_validates(quick_runs, tmp_path) -> None:
    out = tmp_path / "bundle"
    assert main(["convert", str(quick_runs[0]), "-o", str(out)]) == 0
    assert main(["validate", str(out), "--provider", "cpu"]) == 0
    assert main(["generate", str(out), "--prompt", "def ", "-n", "4", "--json"]) == 0
