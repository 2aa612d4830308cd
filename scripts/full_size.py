"""Make a random checkpoint shaped like the released ParScale 1.8B P=8 model and convert it,
printing wall time and peak memory; optionally time decoding of the bundle.

Not part of CI (minutes, ~4 GB of checkpoint and up to 8 GB of bundle per dtype). Example:
  .venv/bin/python scripts/full_size.py --dtype fp32 --decode
  .venv/bin/python scripts/full_size.py --dtype fp32 --quantize int4 --decode
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

from parscale_export.synthetic import parscale_config, write_checkpoint

SHAPE = dict(
    num_hidden_layers=36, hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=2,
    vocab_size=151936, parscale_n=8, parscale_n_tokens=48, tie_word_embeddings=True, torch_dtype="bfloat16",
    max_position_embeddings=32768, rope_theta=1000000.0,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/full-size"))
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--decode", action="store_true", help="also time batch-1 greedy decode on 2 threads")
    args = parser.parse_args()
    checkpoint = args.work / "checkpoint-1.8b-p8"
    if not (checkpoint / "model.safetensors").is_file():
        start = time.perf_counter()
        write_checkpoint(checkpoint, parscale_config(**SHAPE), seed=0)
        print(f"made {checkpoint} in {time.perf_counter() - start:.0f}s", flush=True)
    name = f"bundle-{args.dtype}" + (f"-{args.quantize}" if args.quantize else "")
    bundle = args.work / name
    command = [sys.executable, "-c", "from parscale_export.cli.main import run; run()", "convert", str(checkpoint),
               "-o", str(bundle), "--dtype", args.dtype, "--force"]  # fmt: skip
    if args.quantize:
        command += ["--quantize", args.quantize]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = sum(p.stat().st_size for p in bundle.iterdir())
    result = {"machine": platform.machine(), "bundle": name, "convert_seconds": round(wall, 1),
              "convert_peak_rss_gib": round(peak / 2**30, 2), "bundle_gib": round(size / 2**30, 2)}  # fmt: skip
    if args.decode:
        from parscale_export.bench import measure

        m = measure("onnxruntime", bundle, batch=1, prompt_length=32, steps=16, threads=2)
        result |= {"decode_tokens_per_second": round(m.timing.decode_tokens_per_second, 2),
                   "prefill_seconds": round(m.timing.prefill_seconds, 2),
                   "runtime_peak_rss_gib": round(m.peak_rss_bytes / 2**30, 2)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
