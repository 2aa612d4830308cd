"""A catalog of bad inputs run through the CLI: each gives exit 2, one clear line naming the
file, no traceback, no output directory, and leaves what was there untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY, edit_weights
from parscale_export.cli.main import main

import parscale_export.export as export_module
from parscale_export.synthetic import parscale_config, write_checkpoint


def edit_config(ckpt, **changes) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(raw | changes))


def sharded(ckpt) -> None:
    shutil.rmtree(ckpt)
    write_checkpoint(ckpt, parscale_config(), shards=2)


def index_outside(ckpt) -> None:
    sharded(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


CASES = {
    "missing directory": (lambda c: shutil.rmtree(c), "does not exist"),
    "no config.json": (lambda c: (c / "config.json").unlink(), "no config.json"),
    "malformed config.json": (lambda c: (c / "config.json").write_text("{'single': quotes}"), "not valid JSON"),
    "unsupported model_type": (lambda c: edit_config(c, model_type="mistral"), "unsupported model_type"),
    "truncated safetensors": (
        lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors",
    ),
    "missing tensor": (lambda c: edit_weights(c, lambda t: t.pop("lm_head.weight")), "missing tensor 'lm_head.weight'"),
    "wrong shape": (
        lambda c: edit_weights(c, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:10].clone()})),
        "'model.norm.weight' has shape [10]",
    ),
    "P disagrees with weights": (lambda c: edit_config(c, parscale_n=2), "prefix_k' has shape [4, 2, 8, 16]"),
    "T disagrees with weights": (lambda c: edit_config(c, parscale_n_tokens=48), "the config implies [4, 2, 48, 16]"),
    "non-finite weights": (
        lambda c: edit_weights(c, lambda t: t["model.embed_tokens.weight"].__setitem__((3, 3), float("inf"))),
        "holds NaN or infinite",
    ),
    "shard listed but missing": (
        lambda c: (sharded(c), (c / "model-00002-of-00002.safetensors").unlink()),
        "is listed but missing",
    ),
    "pickle-only weights": (
        lambda c: (c / "model.safetensors").rename(c / "pytorch_model.bin"),
        "only pickle weights",
    ),
    "index points outside": (index_outside, "points outside the checkpoint directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(case: str, tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    damage, message = CASES[case]
    damage(ckpt)
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if ckpt.exists() else [])


def test_disk_full_while_writing(tmp_path, monkeypatch, capsys) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.shutil, "copyfile", full)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep")
    assert main(["convert", str(TINY), "-o", str(tmp_path / "out"), "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "keep", "--force replaces only with a complete bundle"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_real_interrupt_leaves_nothing(tmp_path, signum) -> None:
    """A SIGTERM used to kill convert outright, leaving its .partial- directory behind."""
    out = tmp_path / "out"
    # A shell runs background jobs with SIGINT ignored, and children inherit that: a test run
    # started with `&` would send Ctrl-C into the void. A terminal's Ctrl-C is what we test.
    restore = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    command = [
        sys.executable,
        "-c",
        restore + "from parscale_export.cli.main import run; run()",
        "convert",
        str(TINY),
        "-o",
        str(out),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in process.stderr:  # wait until the export is under way
        if "tracing" in line:
            break
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_validate_truncated_onnx(bundle, tmp_path, capsys) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle(TINY), copy)
    (copy / "model.onnx.data").write_bytes(b"")
    assert main(["validate", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.onnx" in err


def test_symlinked_shard_escaping_is_refused(tmp_path, capsys) -> None:
    outside = write_checkpoint(tmp_path / "outside", parscale_config(), shards=2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        shutil.copy(outside / name, ckpt / name)
    os.symlink(outside / "model-00002-of-00002.safetensors", ckpt / "model-00002-of-00002.safetensors")
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert "points outside the checkpoint directory" in capsys.readouterr().err
