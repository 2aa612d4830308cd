"""Greedy generation with onnxruntime-genai's own generator, on a bundle made with `convert --genai`,
driven as genai's examples drive a model: `params.set_search_options(max_length=...)` with the
prompt plus the new tokens (or, with --max-length unset, the config's default).

Run it with a Python that has onnxruntime-genai (and its own onnxruntime), never beside
onnxruntime-gpu:  .venv-genai/bin/python scripts/genai_generate.py BUNDLE --input-ids "1 2 3" -n 8
Each --input-ids (repeatable) is generated alone, in a generator of its own. Prints one JSON
object: {"tokens": [[new token ids] for each prompt]}; genai's own error, if it refuses, on stderr.
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
    parser.add_argument("--input-ids", required=True, action="append", help="space-separated prompt ids; repeat")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=8, help="stop after this many tokens")
    parser.add_argument(
        "--max-length",
        default="exact",
        help="genai's max_length: 'exact' (prompt + new tokens, the default), 'unset' (genai_config.json's), "
        "or a number",
    )
    parser.add_argument(
        "--no-eos", action="store_true", help="min_length = max_length: genai suppresses EOS, every run has full length"
    )
    args = parser.parse_args()
    model = og.Model(args.bundle)
    prompts = [[int(t) for t in ids.split()] for ids in args.input_ids]
    print(json.dumps({"tokens": [generate(model, prompt, args) for prompt in prompts]}))


def generate(model: og.Model, prompt: list[int], args: argparse.Namespace) -> list[int]:
    params = og.GeneratorParams(model)
    search: dict = {"do_sample": False}
    if args.max_length != "unset":
        exact = len(prompt) + args.max_new_tokens
        search["max_length"] = exact if args.max_length == "exact" else int(args.max_length)
    if args.no_eos:
        config = json.loads((Path(args.bundle) / "genai_config.json").read_text())
        search["min_length"] = search.get("max_length", config["search"]["max_length"])
    params.set_search_options(**search)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < args.max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


if __name__ == "__main__":
    main()
