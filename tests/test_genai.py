"""A bundle made with --genai runs unchanged in onnxruntime-genai's own generator.

genai brings its own onnxruntime, so it lives in a separate virtual environment; `make test`
creates it and names its Python in PARSCALE_GENAI_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import CONFORMANCE, ROOT, TINY, drifted_copy, official
from parscale_export.cli.main import main

from parscale_export.runtime import Runtime

GENAI_PYTHON = os.environ.get("PARSCALE_GENAI_PYTHON")
pytestmark = pytest.mark.skipif(not GENAI_PYTHON, reason="PARSCALE_GENAI_PYTHON not set (make test sets it)")


def genai_greedy(bundle, ids, steps: int) -> list[int]:
    script = ROOT / "scripts" / "genai_generate.py"
    args = [GENAI_PYTHON, str(script), str(bundle), "--input-ids", " ".join(map(str, ids)), "-n", str(steps)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens"]


@pytest.fixture(scope="module")
def genai_bundles(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("genai")
    made = {}
    names = ("p1_plain_mqa", "p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth")
    for ckpt in (*(CONFORMANCE / name for name in names), TINY):
        out = root / ckpt.name
        assert main(["convert", str(ckpt), "-o", str(out), "--genai", "--cache", "dynamic"]) == 0  # contract v1
        made[ckpt.name] = out
    return made


@pytest.mark.parametrize("cache", ["static", "gqa"])
@pytest.mark.parametrize("name", ["p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth"])
def test_genai_drives_in_place_contracts_with_a_shared_buffer(name: str, cache: str, tmp_path) -> None:
    out = tmp_path / name
    assert main(["convert", str(CONFORMANCE / name), "-o", str(out), "--genai", "--cache", cache,
                 "--max-length", "32"]) == 0  # fmt: skip
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert (
        config["search"]["max_length"]
        == 32 + json.loads((out / "manifest.json").read_text())["model"]["parscale_n_tokens"]
    )
    ref = official(name)
    for row in range(3):
        ids = ref["input_ids"][row][ref["attention_mask"][row] == 1]
        assert genai_greedy(out, ids, ref["step_tokens"].shape[1]) == ref["step_tokens"][row].tolist()


@pytest.mark.parametrize("name", ["p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth"])
def test_genai_gives_the_official_greedy_tokens(name: str, genai_bundles: dict) -> None:
    ref = official(name)
    for row in range(3):
        ids = ref["input_ids"][row][ref["attention_mask"][row] == 1]
        assert genai_greedy(genai_bundles[name], ids, ref["step_tokens"].shape[1]) == ref["step_tokens"][row].tolist()


def test_genai_bundle_keeps_our_runtime_working(genai_bundles: dict) -> None:
    path = genai_bundles["tiny-parscale"]
    config = json.loads((path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 4 * 2 and config["model"]["eos_token_id"] == 256
    # ONNX Runtime's thread default (one per physical core), not genai's half of the logical CPUs;
    # genai accepting the key is shown by the run below.
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    ids = [72, 101, 108, 108, 111]
    ours = Runtime(path).greedy(np.array([ids]), np.ones((1, 5), np.int64), 12)[0].tolist()
    # Our tiny fixture's EOS (256) may end genai's run early; compare what both produced.
    theirs = genai_greedy(path, ids, 12)
    assert theirs == ours[: len(theirs)] and len(theirs) >= 1


def genai_engine(bundle, prompts: list[list[int]], max_new: list[int], *flags: str) -> dict:
    script = ROOT / "scripts" / "genai_engine.py"
    args = [GENAI_PYTHON, str(script), str(bundle), "--prompts", ",".join(" ".join(map(str, p)) for p in prompts)]
    args += ["--max-new", ",".join(map(str, max_new)), *flags]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ENGINE_CASES = [
    ("dynamic", ("--no-share-buffer",)),
    ("dynamic", ("--share-buffer",)),
    ("dynamic", ("--no-share-buffer", "--stagger")),
    ("dynamic", ("--share-buffer", "--stagger")),
    ("static", ()),  # contracts v2 and v3: genai_config.json shares the buffer
    ("static", ("--stagger",)),
    ("gqa", ()),
    ("gqa", ("--stagger",)),
]


@pytest.fixture(scope="module")
def static_genai_bundles(tmp_path_factory) -> dict:
    """--genai bundles of the in-place contracts, by (cache, checkpoint name)."""
    root = tmp_path_factory.mktemp("genai-static")
    made = {}
    for cache in ("static", "gqa"):
        for name in ("p1_plain_mqa", "p4_mha_tied_nosmooth"):
            out = root / f"{cache}-{name}"
            args = ["convert", str(CONFORMANCE / name), "-o", str(out), "--genai", "--cache", cache]
            assert main([*args, "--max-length", "64"]) == 0
            made[cache, name] = out
    return made


@pytest.mark.parametrize(("cache", "flags"), ENGINE_CASES)
@pytest.mark.parametrize("name", ["p1_plain_mqa", "p4_mha_tied_nosmooth"])
def test_genai_engine_batches_requests_exactly(
    name: str, cache: str, flags: tuple, genai_bundles: dict, static_genai_bundles: dict
) -> None:
    """genai's Engine pads a batch of mixed prompt lengths on the right, leaves garbage in a
    cache row's padded columns and keeps finished rows: each request must still get exactly
    the tokens it gets alone, from bundles of every contract alike."""
    rng = np.random.default_rng(0)
    vocab = official(name)["prefill_logits"].shape[-1]
    prompts = [rng.integers(1, vocab, size=n).tolist() for n in (5, 9, 13, 7)]
    bundle = genai_bundles[name] if cache == "dynamic" else static_genai_bundles[cache, name]
    result = genai_engine(bundle, prompts, [10, 4, 10, 6], *flags)
    assert [len(t) for t in result["engine"]] == [10, 4, 10, 6]
    assert result["engine"] == result["alone"]


def test_genai_runs_every_p_of_a_family(tmp_path) -> None:
    """Each genai-p{P}/ folder of a family bundle (contract v3, --genai's default) loads in genai
    as it is, gives our runtime's greedy tokens for that P, and holds hard links to the family's
    files, not copies."""
    from parscale_export.export import ExportOptions
    from parscale_export.family import convert_family
    from parscale_export.synthetic import parscale_config, write_family

    family = write_family(tmp_path / "ckpts", parscale_config(parscale_n_tokens=8), (1, 2), seed=4)
    out = tmp_path / "family"
    convert_family(family, out, ExportOptions(genai=True))
    ids = [5, 17, 42, 99]
    for size in (1, 2):
        folder = out / f"genai-p{size}"
        assert (folder / "model.onnx.data").stat().st_ino == (out / "model.onnx.data").stat().st_ino
        ours = Runtime(out, parallel=size).greedy(np.array([ids]), np.ones((1, 4), np.int64), 6)[0].tolist()
        theirs = genai_greedy(folder, ids, 6)
        assert theirs == ours[: len(theirs)] and len(theirs) >= 1


def test_genai_bench_times_both_contracts_with_the_same_tokens(genai_bundles: dict, tmp_path) -> None:
    static = tmp_path / "static"
    assert main(["convert", str(TINY), "-o", str(static), "--genai", "--cache", "static", "--max-length", "64"]) == 0
    args = [GENAI_PYTHON, str(ROOT / "scripts" / "genai_bench.py"), str(genai_bundles["tiny-parscale"]), str(static)]
    args += ["--context", "5", "--context", "9", "--steps", "3", "--rounds", "1", "--vocab", "256"]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["context"] for r in result["results"]] == [5, 9]
    assert all(r["tokens_agree"] and len(r["ms_per_step"]) == 2 for r in result["results"])


def test_genai_bench_explains_where_tokens_part(genai_bundles: dict, tmp_path) -> None:
    """A checkpoint with its final norm negated argmaxes its logits' minimum: --explain must find
    the first step where the tokens differ and report both bundles' best-two gaps there."""
    changed = drifted_copy(tmp_path, "negated", lambda t: t.update({"model.norm.weight": -t["model.norm.weight"]}))
    assert main(["convert", str(changed), "-o", str(tmp_path / "bundle"), "--genai", "--cache", "dynamic"]) == 0
    args = [GENAI_PYTHON, str(ROOT / "scripts" / "genai_bench.py"), str(genai_bundles["tiny-parscale"]),
            str(tmp_path / "bundle"), "--context", "5", "--steps", "4", "--rounds", "1", "--vocab", "256",
            "--explain"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])["results"][0]
    first, other = result["tokens"].values()
    step = next(i for i, (a, b) in enumerate(zip(first, other, strict=True)) if a != b)
    part = result["parting"][str(tmp_path / "bundle")]
    assert part["step"] == step and part["gap_first"] >= 0 and part["gap_other"] >= 0
    assert (part["max_logit_difference_before"] is None) == (step == 0)
    assert f"parts from {genai_bundles['tiny-parscale'].name} at step {step}" in done.stdout
