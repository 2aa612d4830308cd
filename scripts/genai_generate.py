"""Greedy generation with onnxruntime-genai's own generator, on a bundle made with `convert --genai`.

Run it with a Python that has onnxruntime-genai (and its own onnxruntime), never beside
onnxruntime-gpu:  .venv-genai/bin/python scripts/genai_generate.py BUNDLE --input-ids "1 2 3" -n 8
Prints one JSON object: {"tokens": [new token ids]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--input-ids", required=True, help="space-separated prompt token ids")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    prompt = [int(t) for t in args.input_ids.split()]
    # A contract-v2 bundle keeps the learned prefix in genai's shared buffer, whose length is
    # max_length: leave room for its slots, and stop after the tokens asked for.
    contract = json.loads((Path(args.bundle) / "manifest.json").read_text())["contract"]
    model = og.Model(args.bundle)
    params = og.GeneratorParams(model)
    length = len(prompt) + args.max_new_tokens + contract.get("prefix_slots", 0)
    params.set_search_options(do_sample=False, max_length=length)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < args.max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    print(json.dumps({"tokens": tokens}))


if __name__ == "__main__":
    main()
