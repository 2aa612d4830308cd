"""Client conformance, onnxruntime-genai: bundles made with --genai, driven as genai's own
examples drive a model (og.Generator with max_length = prompt + new tokens or unset; og.Engine
with requests of mixed lengths joining and finishing at different times), give the official
tokens in every layout the CLI writes.

genai brings its own onnxruntime, so it lives in a separate virtual environment; `make test`
creates it and names its Python in PARSCALE_GENAI_PYTHON.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import CONFORMANCE, ROOT, TINY, drifted_copy, official
from parscale_export.cli.main import main

from parscale_export.reference import Reference
from parscale_export.runtime import Runtime

GENAI_PYTHON = os.environ.get("PARSCALE_GENAI_PYTHON")
pytestmark = pytest.mark.skipif(not GENAI_PYTHON, reason="PARSCALE_GENAI_PYTHON not set (make test sets it)")


def genai_generate(bundle, prompts: list[list[int]], new: int, max_length: str = "exact", no_eos: bool = True):
    """genai's Generator on each prompt alone, as its examples drive a model (scripts/genai_generate.py):
    the tokens per prompt, or genai's error (a CompletedProcess) when it refuses."""
    script = ROOT / "scripts" / "genai_generate.py"
    args = [GENAI_PYTHON, str(script), str(bundle), "-n", str(new), "--max-length", max_length]
    args += [a for p in prompts for a in ("--input-ids", " ".join(map(str, p)))] + (["--no-eos"] if no_eos else [])
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        return done
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens"]


def genai_greedy(bundle, ids, steps: int) -> list[int]:
    tokens = genai_generate(bundle, [list(map(int, ids))], steps, no_eos=False)
    assert isinstance(tokens, list), tokens.stderr[-2000:]
    return tokens[0]


# What `convert --genai` writes by default, and with each --cache.
LAYOUTS = {"default": [], "static": ["--cache", "static"], "dynamic": ["--cache", "dynamic"]}
MAX_LENGTH = 24  # the in-place bundles' --max-length: small, so that a run reaches it quickly


def _synthetic(root, n: int):
    """P=3 and P=8 with the released T=48 (a short context, so v1's runs to the end stay short)."""
    from parscale_export.synthetic import parscale_config, write_checkpoint

    config = parscale_config(parscale_n=n, parscale_n_tokens=48, max_position_embeddings=40)
    return write_checkpoint(root / f"p{n}-t48", config, seed=n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("genai-checkpoints")
    named = {
        n: CONFORMANCE / name
        for n, name in ((1, "p1_plain_mqa"), (2, "p2_gqa_bf16_sharded"), (4, "p4_mha_tied_nosmooth"))
    }
    return named | {n: _synthetic(root, n) for n in (3, 8)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_genai_generator_as_its_examples_drive_it(n: int, layout: str, checkpoints: dict, tmp_path) -> None:
    """Every bundle --genai writes, driven as genai's examples drive a model, gives the reference's
    greedy tokens: max_length = prompt + new tokens, max_length unset, and a run to the config's
    max_length; a longer max_length is refused by genai with its own clear error."""
    checkpoint, out = checkpoints[n], tmp_path / "bundle"
    length = ["--max-length", str(MAX_LENGTH)] if layout != "dynamic" else []
    assert main(["convert", str(checkpoint), "-o", str(out), "--genai", *LAYOUTS[layout], *length]) == 0
    limit = json.loads((out / "genai_config.json").read_text())["search"]["max_length"]
    reference = Reference.from_checkpoint(checkpoint)
    vocab = reference.model.config.vocab_size
    prompts = [np.random.default_rng(n).integers(1, vocab, size=size).tolist() for size in (5, 11)]

    def greedy(prompt: list[int], steps: int) -> list[int]:
        return reference.greedy(np.array([prompt]), np.ones((1, len(prompt)), np.int64), steps)[0].tolist()

    if (checkpoint / "reference.npz").is_file():  # the official code's own tokens, where we have them
        ref = official(checkpoint.name)
        rows = [ids[mask == 1].tolist() for ids, mask in zip(ref["input_ids"], ref["attention_mask"], strict=True)]
        assert genai_generate(out, rows, ref["step_tokens"].shape[1]) == ref["step_tokens"].tolist()
    want = [greedy(p, 6) for p in prompts]
    assert genai_generate(out, prompts, 6) == want  # max_length = prompt + new, exactly
    assert genai_generate(out, prompts, 6, max_length="unset") == want
    to_the_end = genai_generate(out, prompts, limit, max_length="unset")
    assert to_the_end == [greedy(p, limit - len(p)) for p in prompts]
    refused = genai_generate(out, prompts[:1], 6, max_length=str(limit + 1))
    assert refused.returncode != 0 and f"cannot be greater than model context_length ({limit})" in refused.stderr


@pytest.fixture(scope="module")
def genai_bundles(tmp_path_factory) -> dict:
    """Contract v1 --genai bundles (--cache dynamic), by checkpoint name."""
    root = tmp_path_factory.mktemp("genai")
    made = {}
    names = ("p1_plain_mqa", "p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth")
    for ckpt in (*(CONFORMANCE / name for name in names), TINY):
        out = root / ckpt.name
        assert main(["convert", str(ckpt), "-o", str(out), "--genai", "--cache", "dynamic"]) == 0
        made[ckpt.name] = out
    return made


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
def engine_bundles(tmp_path_factory, checkpoints: dict) -> dict:
    """--genai bundles for the Engine, by (cache, P): v1 with genai's config as written, the in-place ones."""
    root = tmp_path_factory.mktemp("genai-engine")
    made = {}
    for cache, n in itertools.product(("dynamic", "static", "gqa"), (1, 4, 8)):
        out = root / f"{cache}-p{n}"
        length = ["--max-length", "64"] if cache != "dynamic" else []
        assert main(["convert", str(checkpoints[n]), "-o", str(out), "--genai", "--cache", cache, *length]) == 0
        made[cache, n] = out
    return made


@pytest.mark.parametrize(("cache", "flags"), ENGINE_CASES)
@pytest.mark.parametrize("n", [1, 4, 8])
def test_genai_engine_batches_requests_exactly(
    n: int, cache: str, flags: tuple, engine_bundles: dict, checkpoints: dict
) -> None:
    """genai's Engine pads a batch of mixed prompt lengths on the right, leaves garbage in a
    cache row's padded columns and keeps finished rows: each request must still get the
    official tokens (those it gets alone, which are the reference's), from bundles of every
    contract alike, requests submitted together or joining one per step."""
    reference = Reference.from_checkpoint(checkpoints[n])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, reference.model.config.vocab_size, size=size).tolist() for size in (5, 9, 13, 7)]
    news = [10, 4, 10, 6]
    result = genai_engine(engine_bundles[cache, n], prompts, news, *flags)
    assert [len(t) for t in result["engine"]] == news
    assert result["engine"] == result["alone"]
    eos = json.loads((engine_bundles[cache, n] / "genai_config.json").read_text())["model"]["eos_token_id"]
    for prompt, new, tokens in zip(prompts, news, result["alone"], strict=True):
        want = reference.greedy(np.array([prompt]), np.ones((1, len(prompt)), np.int64), new)[0].tolist()
        # The engine suppresses EOS until a request's length (min tokens): equal up to the reference's first EOS.
        until = want.index(eos) if eos in want else new
        assert tokens[:until] == want[:until]


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
