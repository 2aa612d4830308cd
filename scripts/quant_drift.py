"""How far do int8 and int4 bundles drift from the float32 model? The numbers behind validate's
quantized thresholds (parscale_export/validate.py) and the README's quantization table.

For each checkpoint it converts fp32, int8 and int4 bundles, then reports
  - what `validate` measures (random-token prompts, left padding, greedy decode): per-phase
    worst max |error| (absolute and relative to the largest |logit|), worst cosine, worst top-1,
    and the decode steps before the first different greedy choice;
  - greedy agreement on natural prompts: how many of `--tokens` greedy tokens each quantized
    bundle generates before it first differs from the fp32 bundle.
Example (the fixture, and a P=1 model trained the same way):
  .venv/bin/python scripts/quant_drift.py fixtures/tiny-python-p4 build/tiny-python-p1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from parscale_export.export import ExportOptions, convert
from parscale_export.generate import generate
from parscale_export.runtime import Runtime
from parscale_export.text import load_tokenizer
from parscale_export.validate import run_validation

PROMPTS = ["def ", "import os\n", "class ", "    def __init__(self", "        if not ", "    return "]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measure(checkpoint: Path, work: Path, tokens: int) -> list[dict]:
    bundles = {}
    for scheme in ("fp32", "int8", "int4"):
        bundles[scheme] = work / f"{checkpoint.name}-{scheme}"
        convert(checkpoint, bundles[scheme], ExportOptions(quantize=None if scheme == "fp32" else scheme))
    tokenizer = load_tokenizer(bundles["fp32"])
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]

    def greedy(bundle: Path) -> list[list[int]]:
        runtime = Runtime(bundle, provider="cpu")
        return [generate(runtime, [p], tokens)[0] for p in prompts]  # one at a time: no padding

    reference = greedy(bundles["fp32"])
    rows = []
    for scheme in ("int8", "int4"):
        report = run_validation(bundles[scheme], checkpoint, provider="cpu")  # the scheme's default thresholds
        phases = report.phases
        agree = [agreeing_prefix(r, q) for r, q in zip(reference, greedy(bundles[scheme]), strict=True)]
        rows.append(
            {
                "checkpoint": str(checkpoint),
                "scheme": scheme,
                "max_abs": max(p.max_abs for p in phases),
                # what a scaled threshold compares: |error| / max(1, the reference's largest |logit|)
                "max_relative": max(p.max_abs / max(1.0, p.reference_max_abs) for p in phases),
                "reference_max_abs": max(p.reference_max_abs for p in phases),
                "min_cosine": min(p.min_cosine for p in phases),
                "min_top1": min(p.top1 for p in phases),
                "validate_greedy_steps": [
                    p.greedy_agreeing_steps for p in phases if p.greedy_agreeing_steps is not None
                ],
                "natural_greedy_agreement": agree,
                "natural_tokens": tokens,
                "validate_with_defaults": "pass" if report.passed else "fail",
                "failures": [f"{p.name}: {f}" for p in phases for f in p.failures],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per natural prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [row for ckpt in args.checkpoints for row in measure(ckpt, Path(work), args.tokens)]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
