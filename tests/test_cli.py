"""The CLI: exit codes, messages, atomic output, and byte-identical bundles."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY
from parscale_export.cli.main import main

import parscale_export.export as export_module
from parscale_export.bundle import DATA_FILE, MANIFEST_FILE, MODEL_FILE


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_help_teaches(capsys) -> None:
    assert main(["--help"]) == 0
    assert "convert" in capsys.readouterr().out
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "b*P + p" in out and "--dtype" in out


def test_convert_writes_a_complete_bundle(tmp_path, capsys) -> None:
    out = tmp_path / "bundle"
    assert main(["convert", str(TINY), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "model.onnx" in captured.out and "loading weights" in captured.err
    assert siblings(out) == ["bundle"], "no temporary directory may remain"
    names = {p.name for p in out.iterdir()}
    assert {MODEL_FILE, DATA_FILE, MANIFEST_FILE, "config.json", "tokenizer.json", "generation_config.json"} <= names
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["model"]["parscale_n"] == 4 and manifest["model"]["parscale_n_tokens"] == 8
    assert manifest["contract"]["version"] == 3 and manifest["opset"] == 23  # the in-place cache, by default
    assert manifest["source"]["weights"].startswith("sha256:")
    assert manifest["versions"]["torch"] and manifest["versions"]["onnx"]


def test_two_converts_are_byte_identical(tmp_path) -> None:
    for name in ("a", "b"):
        assert main(["convert", str(TINY), "-o", str(tmp_path / name)]) == 0
    for file in (MODEL_FILE, DATA_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_non_empty_output_is_refused_and_untouched(tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(TINY), "-o", str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(TINY), "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / MODEL_FILE).is_file()
    assert siblings(out) == ["busy"]


def test_bad_checkpoint_leaves_nothing(tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.safetensors" in last
    assert err.count("error") == 1 and "Traceback" not in err
    assert not out.exists() and siblings(out) == ["ckpt"]


def test_uncreatable_output(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(TINY), "-o", str(tmp_path / "file" / "sub" / "out")]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err


def test_interrupt_leaves_nothing(tmp_path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_export_onnx", interrupted)
    out = tmp_path / "out"
    assert main(["convert", str(TINY), "-o", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path, capsys) -> None:
    assert main(["--debug", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["convert"], ["convert", str(TINY), "-o", "x", "--dtype", "int3"], ["nope"]])
def test_usage_errors_exit_2(args, capsys) -> None:
    assert main(args) == 2


def test_output_that_is_or_holds_the_checkpoint_is_refused(tmp_path, capsys) -> None:
    ckpt = tmp_path / "models" / "ckpt"
    shutil.copytree(TINY, ckpt)
    for out in (ckpt, tmp_path / "models"):
        assert main(["convert", str(ckpt), "-o", str(out), "--force"]) == 2
        assert "contains the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in TINY.iterdir())
