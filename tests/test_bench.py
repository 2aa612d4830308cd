"""bench: both engines measured in their own processes, same greedy tokens, ratios printed."""

from __future__ import annotations

import json

from conftest import CONFORMANCE, TINY
from parscale_export.cli.main import main

FAST = ["--batch", "1", "--prompt-length", "8", "--steps", "3", "--provider", "cpu"]


def test_json_has_both_engines_agreeing(bundle, capsys) -> None:
    assert main(["bench", str(bundle(TINY)), *FAST, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["machine"]["threads"] == 2 and data["machine"]["device"]
    ort, torch_run = data["measurements"]
    assert (ort["engine"], torch_run["engine"]) == ("onnxruntime", "pytorch")
    assert ort["tokens"] == torch_run["tokens"] and len(ort["tokens"][0]) == 3
    assert ort["decode_tokens_per_second"] > 0 and ort["peak_rss_bytes"] > 0


def test_table_with_p_scaling(bundle, capsys) -> None:
    bundles = [str(bundle(CONFORMANCE / "p1_plain_mqa")), str(bundle(CONFORMANCE / "p4_mha_tied_nosmooth"))]
    assert main(["bench", *bundles, *FAST, "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "machine: CPU" in out and "P scaling" in out and "P=4" in out


def test_checkpoint_with_several_bundles_is_a_usage_error(bundle, capsys) -> None:
    args = ["bench", str(bundle(TINY)), str(bundle(TINY)), "--checkpoint", str(TINY)]
    assert main(args) == 2
    assert "--checkpoint applies to one bundle" in capsys.readouterr().err


def test_several_prompt_lengths_give_step_time_vs_context(bundle, capsys) -> None:
    args = ["bench", str(bundle(TINY)), str(bundle(TINY, cache="static")), "--batch", "1", "--steps", "2"]
    args += ["--rounds", "2"]
    assert main([*args, "--prompt-length", "4", "--prompt-length", "12", "--provider", "cpu", "--no-reference"]) == 0
    out, err = capsys.readouterr()
    assert "step time vs context" in out and "round 2/2" in err
    context_lines = out.split("step time vs context")[1].strip().splitlines()[1:]
    assert len(context_lines) == 2 and all("4: " in line and "12: " in line for line in context_lines)
