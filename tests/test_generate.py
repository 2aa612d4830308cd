"""Generation on ONNX Runtime: batching, sampling, EOS, the CLI, and the official greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONFORMANCE, TINY, official
from parscale_export.cli.main import main

from parscale_export.generate import Sampling, choose, generate
from parscale_export.runtime import Runtime
from parscale_export.text import load_tokenizer

PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [7, 200], [33, 34, 35, 36]]


@pytest.fixture(scope="module")
def tiny(bundle) -> Runtime:
    return Runtime(bundle(TINY))


def test_batch_with_padding_equals_one_by_one(tiny: Runtime) -> None:
    batched = generate(tiny, PROMPTS, max_new_tokens=10)
    alone = [generate(tiny, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 10 for t in batched)


def test_sampling_with_a_seed_is_reproducible(tiny: Runtime) -> None:
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = generate(tiny, PROMPTS, 16, sampling=sampling)
    assert generate(tiny, PROMPTS, 16, sampling=sampling) == first
    other = generate(tiny, PROMPTS, 16, sampling=Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=8))
    assert other != first, "a different seed should give different samples"
    assert first != generate(tiny, PROMPTS, 16), "sampling at temperature 1 should differ from greedy"


def test_top_k_1_is_greedy(tiny: Runtime) -> None:
    assert generate(tiny, PROMPTS, 8, sampling=Sampling(temperature=1.5, top_k=1, seed=0)) == generate(tiny, PROMPTS, 8)


def test_top_p_keeps_the_smallest_sufficient_set() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    picks = {int(choose(logits, Sampling(temperature=1.0, top_p=0.7), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(choose(logits, Sampling(temperature=1.0, top_p=0.4), rng)[0]) for _ in range(50)}
    assert picks == {0}


def test_eos_stops_a_row_and_is_kept(tiny: Runtime) -> None:
    greedy = generate(tiny, PROMPTS, 6)
    eos = greedy[1][2]
    stopped = generate(tiny, PROMPTS, 6, eos_ids=[eos])
    assert stopped[1] == greedy[1][:3]
    for row in (0, 2):  # other rows run on unless they meet the same token
        expected = greedy[row][: greedy[row].index(eos) + 1] if eos in greedy[row] else greedy[row]
        assert stopped[row] == expected


@pytest.mark.parametrize("name", ["p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth", "p1_plain_mqa"])
def test_cli_input_ids_give_the_official_greedy_tokens(name: str, bundle, capsys) -> None:
    ref = official(name)
    path = bundle(CONFORMANCE / name)
    for row in range(3):
        ids = ref["input_ids"][row][ref["attention_mask"][row] == 1]
        steps = ref["step_tokens"].shape[1]
        args = ["generate", str(path), "--input-ids", " ".join(map(str, ids)), "-n", str(steps), "--json"]
        assert main([*args, "--provider", "cpu"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] == ref["step_tokens"][row].tolist()


def test_cli_prompt_uses_the_tokenizer(bundle, capsys) -> None:
    path = bundle(TINY)
    assert main(["generate", str(path), "--prompt", "Hello", "-n", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(path)
    assert len(result["tokens"]) == 5 and result["text"] == tokenizer.decode(result["tokens"])
    assert result["tokens"] == generate(Runtime(path), [tokenizer.encode("Hello").ids], 5)[0]
    assert main(["generate", str(path), "--prompt", "Hello", "-n", "5"]) == 0  # streamed text
    assert capsys.readouterr().out.endswith("\n")


def test_cli_batch_json(bundle, capsys) -> None:
    args = ["generate", str(bundle(TINY)), "--input-ids", "1 2 3", "--input-ids", "9", "-n", "3", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) == 2 and len(result["text"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-ids", "1 x"], "expected integers"),
        (["--input-ids", "99999"], "outside the vocabulary"),
        ([], "either --prompt or --input-ids"),
        (["--prompt", "a", "--input-ids", "1"], "either --prompt or --input-ids"),
    ],
)
def test_cli_bad_arguments(args, message, bundle, capsys) -> None:
    assert main(["generate", str(bundle(TINY)), *args]) == 2
    assert message in capsys.readouterr().err
