"""Greedy generation with onnxruntime-genai's own generator, on a bundle made with `convert --genai`.

Run it with a Python that has onnxruntime-genai (and its own onnxruntime), never beside
onnxruntime-gpu:  .venv-genai/bin/python scripts/genai_generate.py BUNDLE --input-ids "1 2 3" -n 8
Prints one JSON object: {"tokens": [new token ids]}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime_genai as og


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--input-ids", required=True, help="space-separated prompt token ids")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    prompt = [int(t) for t in args.input_ids.split()]
    model = og.Model(args.bundle)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + args.max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    print(json.dumps({"tokens": sequence[len(prompt) :]}))


if __name__ == "__main__":
    main()
