"""Decode step time of several bundles in onnxruntime-genai's own generator, side by side.

Bundles are timed one after another in each round (interleaved, so a noisy machine hits them
alike), best of the rounds; each gets the same random prompt at each context, and the script
says whether their greedy tokens agree. Works for our `--genai` bundles (either cache contract)
and for any graph genai loads, e.g. the genai model builder's. Run it with the genai venv:

    .venv-genai/bin/python scripts/genai_bench.py ./v1-genai ./v2-genai --context 64 --context 960

Prints one line per bundle and context, then one JSON object (ms per step, best and per round,
the greedy tokens, and whether they agree).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def prefix_slots(bundle: Path) -> int:
    """Slots a contract-v2 bundle keeps for its prefix in genai's shared buffer (else 0)."""
    manifest = bundle / "manifest.json"
    return json.loads(manifest.read_text())["contract"].get("prefix_slots", 0) if manifest.is_file() else 0


def decode(model: og.Model, prompt: np.ndarray, steps: int, extra_slots: int) -> tuple[float, list[int]]:
    """Seconds per decode step after `prompt`, and the greedy tokens."""
    params = og.GeneratorParams(model)
    length = prompt.shape[1] + steps + 1 + extra_slots
    params.set_search_options(do_sample=False, max_length=length, min_length=length)  # EOS must not end a timing
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # the prefill's token, not timed
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return (time.perf_counter() - start) / steps, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--context", type=int, action="append", help="prompt tokens; repeat (default 64)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [0, vocab)")
    args = parser.parse_args()
    models = {path: og.Model(str(path)) for path in args.bundles}
    results = []
    for context in args.context or [64]:
        prompt = np.random.default_rng(context).integers(0, args.vocab, size=(1, context)).astype(np.int32)
        rounds: dict[Path, list[float]] = {path: [] for path in models}
        tokens: dict[Path, list[int]] = {}
        for _ in range(args.rounds):
            for path, model in models.items():
                seconds, tokens[path] = decode(model, prompt, args.steps, prefix_slots(path))
                rounds[path].append(seconds)
        best = {path: min(times) for path, times in rounds.items()}
        agree = len({tuple(t) for t in tokens.values()}) == 1
        for path in args.bundles:
            print(f"context {context:5d}  {path.name:28s} {1e3 * best[path]:8.2f} ms/step")
        print(f"context {context:5d}  greedy tokens {'agree' if agree else 'DIFFER'}")
        results.append({"context": context, "ms_per_step": {str(p): 1e3 * best[p] for p in args.bundles},
                        "ms_rounds": {str(p): [1e3 * s for s in rounds[p]] for p in args.bundles},
                        "tokens": {str(p): tokens[p] for p in args.bundles}, "tokens_agree": agree})  # fmt: skip
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
