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


def prefix_slots(bundle: Path) -> int:
    """Slots of genai's max_length the learned prefix takes: an in-place bundle (contracts v2 and
    v3) keeps it in genai's shared buffer, so leave room for them and stop after the tokens asked
    for. A family's genai-p{P}/ folder holds no manifest: the family's, one folder up, has P's.
    Anything else (contract v1, the genai builder's graphs) takes none."""
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["contract"].get("prefix_slots", 0)
    family = bundle.parent / "manifest.json"
    if bundle.name.startswith("genai-p") and family.is_file():
        member = json.loads(family.read_text())["members"][bundle.name.removeprefix("genai-p")]
        return member["contract"].get("prefix_slots", 0)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--input-ids", required=True, help="space-separated prompt token ids")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    prompt = [int(t) for t in args.input_ids.split()]
    model = og.Model(args.bundle)
    params = og.GeneratorParams(model)
    length = len(prompt) + args.max_new_tokens + prefix_slots(Path(args.bundle))
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
