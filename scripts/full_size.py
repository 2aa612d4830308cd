"""Make a random checkpoint shaped like the released ParScale 1.8B P=8 model and convert it,
printing wall time and peak memory; optionally time decoding of the bundle at given contexts.

Decode is timed after a synthetic context: the cache is a past of `--context` tokens (v1) or a
buffer whose first `--context` slots count as written (v2, v3), filled with a constant, not the
result of a prefill (a real 2048-token prefill of 8 streams through 1.8B parameters would take
over ten minutes on 2 cores). Filled, not zeroed: numpy's zeros are pages the kernel has not
mapped yet, every one of them the same shared zero page, and reading them costs almost nothing
(the mid-size P=4 int4 v2 step at context 960 took 1.9 ms over such a buffer, 2.75 ms over a
written one); the values themselves do not change a step's cost.

Not part of CI (minutes, ~4 GB of checkpoint and up to 8 GB of bundle per dtype). Example:
  .venv/bin/python scripts/full_size.py --dtype fp32 --decode --context 32 --context 2048
  .venv/bin/python scripts/full_size.py --dtype fp32 --quantize int4 --cache static --decode
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from parscale_export.synthetic import parscale_config, write_checkpoint

SHAPE = dict(
    num_hidden_layers=36, hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=2,
    vocab_size=151936, parscale_n=8, parscale_n_tokens=48, tie_word_embeddings=True, torch_dtype="bfloat16",
    max_position_embeddings=32768, rope_theta=1000000.0,
)  # fmt: skip


def decode_speed(bundle: Path, context: int, steps: int) -> float:
    """Batch-1 decode tokens/s over `steps` one-token calls after a synthetic `context` (see above)."""
    from parscale_export.runtime import Runtime

    runtime = Runtime(bundle, "cpu", threads=2)
    contract = runtime.contract
    past = (
        contract.empty_past(1, context + steps + 1)
        if contract.cache.in_place
        else [np.empty(contract.cache_shape(1, context), dtype=contract.np_dtype) for _ in contract.past_names()]
    )
    for tensor in past:
        tensor.fill(0.01)  # writes every page (see the module docstring)
    token = np.zeros((1, 1), dtype=np.int64)
    _, past = runtime.run(token, np.ones((1, context + 1), dtype=np.int64), past)  # warm-up
    start = time.perf_counter()
    for step in range(steps):
        _, past = runtime.run(token, np.ones((1, context + step + 2), dtype=np.int64), past)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/full-size"))
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--cache", choices=["dynamic", "static", "gqa"], default="dynamic", help="contract v1, v2, v3")
    parser.add_argument("--decode", action="store_true", help="also time batch-1 decode on 2 threads")
    parser.add_argument("--context", type=int, action="append", help="tokens in the cache when timing (default 32)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed at each context")
    args = parser.parse_args()
    args.context = args.context or [32]
    checkpoint = args.work / "checkpoint-1.8b-p8"
    if not (checkpoint / "model.safetensors").is_file():
        start = time.perf_counter()
        write_checkpoint(checkpoint, parscale_config(**SHAPE), seed=0)
        print(f"made {checkpoint} in {time.perf_counter() - start:.0f}s", flush=True)
    name = f"bundle-{args.dtype}" + (f"-{args.quantize}" if args.quantize else "")
    name += {"dynamic": "", "static": "-v2", "gqa": "-v3"}[args.cache]
    bundle = args.work / name
    command = [sys.executable, "-c", "from parscale_export.cli.main import run; run()", "convert", str(checkpoint),
               "-o", str(bundle), "--dtype", args.dtype, "--force"]  # fmt: skip
    if args.quantize:
        command += ["--quantize", args.quantize]
    if args.cache != "dynamic":
        command += ["--cache", args.cache, "--max-length", str(max(args.context) + args.steps + 1)]
    result = {"machine": platform.machine(), "bundle": name}
    if (bundle / "manifest.json").is_file():
        result["convert"] = "reused the bundle already there"
    else:
        start = time.perf_counter()
        subprocess.run(command, check=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result["convert_seconds"] = round(time.perf_counter() - start, 1)
        result["convert_peak_rss_gib"] = round(peak_kib / 2**20, 2)
    result["bundle_gib"] = round(sum(p.stat().st_size for p in bundle.iterdir()) / 2**30, 2)
    if args.decode:
        speeds = {ctx: round(decode_speed(bundle, ctx, args.steps), 2) for ctx in args.context}
        result["decode_tokens_per_second"] = speeds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
