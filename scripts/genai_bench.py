"""Decode step time of several bundles in onnxruntime-genai's own generator, side by side.

Bundles are timed one after another in each round (interleaved, so a noisy machine hits them
alike), best of the rounds; each gets the same random prompt at each context, and the script
says whether their greedy tokens agree. Works for our `--genai` bundles (either cache contract)
and for any graph genai loads, e.g. the genai model builder's. Run it with the genai venv:

    .venv-genai/bin/python scripts/genai_bench.py ./v1-genai ./v2-genai --context 64 --context 960

Prints one line per bundle and context, then one JSON object (ms per step, best and per round,
the greedy tokens, and whether they agree). With --explain, where a bundle's tokens part from
the first bundle's, an untimed pass says at which step, how far apart each one's two best logits
were there (a near tie falls either way under rounding), and how far their logits had been apart
before it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def prefilled(model: og.Model, prompt: np.ndarray, steps: int) -> og.Generator:
    """A greedy generator after `prompt` and the prefill's token, forced to last `steps` more
    tokens (EOS must not end a timing). max_length is prompt + new tokens, as genai's examples set it."""
    params = og.GeneratorParams(model)
    length = prompt.shape[1] + steps + 1
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()
    return generator


def decode(model: og.Model, prompt: np.ndarray, steps: int) -> tuple[float, list[int]]:
    """Seconds per decode step after `prompt` (the prefill not timed), and the greedy tokens."""
    generator = prefilled(model, prompt, steps)
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return (time.perf_counter() - start) / steps, tokens


def greedy_logits(model: og.Model, prompt: np.ndarray, steps: int) -> tuple[list[int], np.ndarray]:
    """The timed steps' greedy tokens and their logits, untimed (copying logits costs time)."""
    generator = prefilled(model, prompt, steps)
    tokens, logits = [], []
    for _ in range(steps):
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        step = np.asarray(generator.get_output("logits"))
        logits.append(step.reshape(-1, step.shape[-1])[-1].copy())
    return tokens, np.stack(logits)


def parting(first: tuple[list[int], np.ndarray], other: tuple[list[int], np.ndarray]) -> dict | None:
    """Where `other`'s greedy tokens part from `first`'s (None if they never do): the step, each
    one's gap between its two best logits there, and their largest logit difference before it.
    Logits beyond 1e30 in size are left out: genai sets EOS's to the float minimum until
    min_length, and the two bundles may name different EOS ids."""
    (tokens, logits), (other_tokens, other_logits) = first, other
    step = next((i for i, (a, b) in enumerate(zip(tokens, other_tokens, strict=True)) if a != b), None)
    if step is None:
        return None

    def gap(row: np.ndarray) -> float:
        second, best = np.sort(row[np.abs(row) < 1e30])[-2:]
        return float(best - second)

    same = (np.abs(logits[:step]) < 1e30) & (np.abs(other_logits[:step]) < 1e30)
    before = float(np.abs(logits[:step] - other_logits[:step])[same].max()) if step else None
    return {"step": step, "gap_first": gap(logits[step]), "gap_other": gap(other_logits[step]),
            "max_logit_difference_before": before}  # fmt: skip


def explain(models: dict[Path, og.Model], prompt: np.ndarray, steps: int, context: int) -> dict[str, dict]:
    """`parting` of every bundle from the first, printed and returned by bundle."""
    runs = {path: greedy_logits(model, prompt, steps) for path, model in models.items()}
    first, *others = runs
    partings = {}
    for path in others:
        if (part := parting(runs[first], runs[path])) is None:
            continue
        partings[str(path)] = part
        before = part["max_logit_difference_before"]
        print(f"context {context:5d}  {path.name} parts from {first.name} at step {part['step']}: best two logits "
              f"{part['gap_first']:.4f} apart in {first.name}, {part['gap_other']:.4f} in {path.name}"
              + (f"; logits at most {before:.4f} apart before" if before is not None else ""))  # fmt: skip
    return partings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--context", type=int, action="append", help="prompt tokens; repeat (default 64)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [0, vocab)")
    parser.add_argument("--explain", action="store_true", help="say where and how narrowly tokens part")
    args = parser.parse_args()
    models = {path: og.Model(str(path)) for path in args.bundles}
    results = []
    for context in args.context or [64]:
        prompt = np.random.default_rng(context).integers(0, args.vocab, size=(1, context)).astype(np.int32)
        rounds: dict[Path, list[float]] = {path: [] for path in models}
        tokens: dict[Path, list[int]] = {}
        for _ in range(args.rounds):
            for path, model in models.items():
                seconds, tokens[path] = decode(model, prompt, args.steps)
                rounds[path].append(seconds)
        best = {path: min(times) for path, times in rounds.items()}
        agree = len({tuple(t) for t in tokens.values()}) == 1
        for path in args.bundles:
            print(f"context {context:5d}  {path.name:28s} {1e3 * best[path]:8.2f} ms/step")
        print(f"context {context:5d}  greedy tokens {'agree' if agree else 'DIFFER'}")
        result = {"context": context, "ms_per_step": {str(p): 1e3 * best[p] for p in args.bundles},
                  "ms_rounds": {str(p): [1e3 * s for s in rounds[p]] for p in args.bundles},
                  "tokens": {str(p): tokens[p] for p in args.bundles}, "tokens_agree": agree}  # fmt: skip
        if args.explain and not agree:
            result["parting"] = explain(models, prompt, args.steps, context)
        results.append(result)
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
