"""Peak memory of a family bundle with every P loaded in one process, against one P=8 session.

Writes a mid-size family (vocab 32000, hidden 512, intermediate 1408, 8 layers, 8/2 heads, T=48:
one backbone, P = 1, 2, 4, 8 sharing it), converts it to one family bundle and P=8 alone to an
ordinary bundle, then measures each case in a fresh process (peak RSS after loading and a short
greedy run on every session) and prints the ratios to the single P=8 session. It also times P=8
decoding (batch 1, 64-token prompt, 32 steps, best of 3) in each case: sharing turns off ONNX
Runtime's weight prepacking, which would give every session a private packed copy.

Usage: python scripts/family_memory.py [--work build/family-memory] [--threads 2] [--quantize int4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, parscale_n_tokens=48)  # fmt: skip
SIZES = (1, 2, 4, 8)
CASES = {
    "single P=8 bundle, one session": "single",
    "family, P=8 only (shared weights)": "family-p8",
    "family, P=1,2,4,8 with shared weights (default)": "shared",
    "family, P=1,2,4,8 with shared weights, prepacking off": "shared-unpacked",
    "family, P=1,2,4,8 with shared weights + prepacking": "shared-prepacked",
    "family, P=1,2,4,8 as separate sessions": "separate",
}


def prepare(work: Path, quantize: str | None) -> None:
    from parscale_export.export import ExportOptions, convert
    from parscale_export.family import convert_family
    from parscale_export.synthetic import parscale_config, write_family

    if (work / "family").is_dir() and (work / "single-p8").is_dir():
        return
    checkpoints = write_family(work / "checkpoints", parscale_config(**SHAPE), SIZES, seed=11)
    convert(work / "checkpoints" / "p8", work / "single-p8", ExportOptions(quantize=quantize), force=True)
    convert_family(checkpoints, work / "family", ExportOptions(quantize=quantize), force=True)


def child(case: str, work: Path, threads: int) -> dict:
    """Load, run a short greedy generation on every session, report peak RSS (and P=8 decode time)."""
    import numpy as np

    from parscale_export.bench import time_generation
    from parscale_export.runtime import Runtime, load_family
    from parscale_export.sharing import SharedWeights

    family = work / "family"
    if case == "single":
        runtimes = {8: Runtime(work / "single-p8", threads=threads)}
    elif case == "family-p8":
        runtimes = load_family(family, [8], threads=threads)
    elif case == "shared":
        runtimes = load_family(family, threads=threads)
    elif case == "shared-unpacked":
        shared = SharedWeights(family, prepacking=False)
        runtimes = {p: Runtime(family, threads=threads, parallel=p, shared=shared) for p in SIZES}
    elif case == "shared-prepacked":
        shared = SharedWeights(family, prepacking=True)
        runtimes = {p: Runtime(family, threads=threads, parallel=p, shared=shared) for p in SIZES}
    else:
        runtimes = {p: Runtime(family, threads=threads, parallel=p) for p in SIZES}
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(1, 64), dtype=np.int64)
    mask = np.ones_like(ids)
    for runtime in runtimes.values():
        runtime.greedy(ids, mask, steps=4)
    timing = time_generation(runtimes[8], SHAPE["vocab_size"], batch=1, prompt_length=64, steps=32)
    return {"peak_rss": peak_rss(), "p8_decode": timing.decode_tokens_per_second}


def peak_rss() -> int:
    """VmHWM, this process image's own high-water mark: ru_maxrss survives exec, so a child
    started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/family-memory"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=("int8", "int4"), help="measure quantized bundles (use another --work)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.threads)))
        return
    prepare(args.work, args.quantize)
    sizes = {p.name: p.stat().st_size for d in ("single-p8", "family") for p in (args.work / d).iterdir()}
    single_disk = sum(p.stat().st_size for p in (args.work / "single-p8").iterdir())
    family_disk = sum(p.stat().st_size for p in (args.work / "family").iterdir())
    shared = sizes["model.onnx.data"] / 2**20
    print(f"disk: single P=8 bundle {single_disk / 2**20:.1f} MiB, family P=1,2,4,8 {family_disk / 2**20:.1f} MiB "
          f"({family_disk / single_disk:.2f}x); shared data file {shared:.1f} MiB")  # fmt: skip
    results = {}
    for label, case in CASES.items():
        command = [sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads), "--child", case]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["single P=8 bundle, one session"]
    print(f"{'case':52s} {'peak RSS':>10s} {'ratio':>6s} {'P=8 decode tok/s':>17s}")
    for label, r in results.items():
        print(f"{label:52s} {r['peak_rss'] / 2**20:6.0f} MiB {r['peak_rss'] / base['peak_rss']:5.2f}x "
              f"{r['p8_decode']:17.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
