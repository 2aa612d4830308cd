"""Make a random checkpoint shaped like a released ParScale P=8 model (1.8B or 4.7B) and convert
it, printing wall time, peak memory and bundle size; optionally validate the bundle and time
decoding at given contexts.

Peak memory is the anonymous resident memory of the command's whole process tree (peakmemory),
sampled from /proc: what the process holds, not the page cache of the files it reads and
writes (a memory cgroup's peak counts both; ru_maxrss counts mapped files).

Decode is timed after a synthetic context: the cache is a past of `--context` tokens (v1) or a
buffer whose first `--context` slots count as written (v2, v3), filled with a constant, not the
result of a prefill (a real 2048-token prefill of 8 streams through 1.8B parameters would take
over ten minutes on 2 cores). Filled, not zeroed: numpy's zeros are pages the kernel has not
mapped yet, every one of them the same shared zero page, and reading them costs almost nothing
(the mid-size P=4 int4 v2 step at context 960 took 1.9 ms over such a buffer, 2.75 ms over a
written one); the values themselves do not change a step's cost.

Not part of CI (minutes; the 4.7B checkpoint is 9.4 GB of bf16 and its fp32 bundle 18 GB).
The checkpoint is written a shard at a time, so making it holds one shard, not the model.
Examples:
  .venv/bin/python scripts/full_size.py --shape 1.8b --dtype fp32 --decode --context 32 --context 2048
  .venv/bin/python scripts/full_size.py --shape 4.7b --quantize int4 --validate --decode
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from parscale_export.checkpoint import INDEX_FILE, expected_shapes
from parscale_export.config import parse_config
from parscale_export.intweights import BLOCK_SIZE
from parscale_export.peakmemory import run_measured
from parscale_export.synthetic import DTYPES, parscale_config

COMMON = dict(num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, parscale_n=8, parscale_n_tokens=48,
              tie_word_embeddings=True, torch_dtype="bfloat16", max_position_embeddings=32768,
              rope_theta=1000000.0)  # fmt: skip
SHAPES = {
    "1.8b": COMMON | dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=5504),
    "4.7b": COMMON | dict(num_hidden_layers=36, hidden_size=2560, intermediate_size=13824),
}
SHARD_BYTES = 1 << 30
# The weights MatMulNBits quantizes: every projection, the aggregation MLP's and the (tied) head's.
GRID_SUFFIXES = ("proj.weight", "aggregate_layer.0.weight", "aggregate_layer.2.weight", "embed_tokens.weight")
CLI = [sys.executable, "-c", "from parscale_export.cli.main import run; run()"]


def on_int4_grid(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A matrix [out, in] that int4 MatMulNBits holds exactly, also in bf16 and fp16: each block of
    32 inputs is integers in [-8, 7] times one scale, led by -8 (which fixes the scale the
    quantizer picks), the scales with 4 significant bits (so every product has at most 8)."""
    rows, cols = weight.shape
    ints = torch.randint(-7, 8, (rows, cols // BLOCK_SIZE, BLOCK_SIZE), generator=gen).float()
    ints[:, :, 0] = -8
    mantissa = 1 + torch.randint(0, 8, (rows, cols // BLOCK_SIZE, 1), generator=gen).float() / 8
    scale = mantissa * 2.0 ** math.floor(math.log2(0.25 / cols**0.5))
    return (ints * scale).reshape(rows, cols)


def write_synthetic(directory: Path, raw: dict, seed: int = 0, grid: bool = False) -> None:
    """Random weights (drawn as synthetic.random_weights draws them; with `grid`, every matrix
    int4 quantizes, the tied head included, on_int4_grid) in shards of about SHARD_BYTES, each
    written as soon as it is full: memory holds one shard."""
    config = parse_config(raw)
    dtype = DTYPES[raw["torch_dtype"]]
    shapes = expected_shapes(config)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith(("prefix_k", "prefix_v", "embed_tokens.weight")):
                tensor = torch.randn(shape, generator=gen)
            elif name.endswith("bias"):
                tensor = 0.1 * torch.randn(shape, generator=gen)
            else:
                tensor = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
            if grid and name.endswith(GRID_SUFFIXES):
                tensor = on_int4_grid(tensor, gen)
            shard[name] = tensor.to(dtype).contiguous()
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": raw["vocab_size"] - 1}) + "\n")


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


def gib(size: float) -> float:
    return round(size / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="1.8b")
    parser.add_argument("--work", type=Path, default=Path("build/full-size"))
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--cache", choices=["dynamic", "static", "gqa"], default="gqa", help="contract v1, v2, v3")
    parser.add_argument("--validate", action="store_true", help="also validate the bundle (CPU), measured")
    parser.add_argument("--decode", action="store_true", help="also time batch-1 decode on 2 threads")
    parser.add_argument("--context", type=int, action="append", help="tokens in the cache when timing (default 32)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed at each context")
    parser.add_argument("--drop", action="store_true", help="delete the bundle afterwards (they are large)")
    parser.add_argument(
        "--int4-grid",
        action="store_true",
        help="draw every quantized matrix on int4's grid, so an int4 bundle holds the weights exactly and "
        "validate's int4 thresholds (measured on trained weights) mean something on random ones",
    )
    args = parser.parse_args()
    args.context = args.context or [32]
    checkpoint = args.work / (f"checkpoint-{args.shape}-p8" + ("-int4-grid" if args.int4_grid else ""))
    if not (checkpoint / INDEX_FILE).is_file():
        start = time.perf_counter()
        write_synthetic(checkpoint, parscale_config(**SHAPES[args.shape]), seed=0, grid=args.int4_grid)
        print(f"made {checkpoint} in {time.perf_counter() - start:.0f}s", flush=True)
    name = f"bundle-{args.shape}" + ("-grid" if args.int4_grid else "") + f"-{args.dtype}"
    name += f"-{args.quantize}" if args.quantize else ""
    name += {"dynamic": "-v1", "static": "-v2", "gqa": "-v3"}[args.cache]
    bundle = args.work / name
    command = [*CLI, "convert", str(checkpoint), "-o", str(bundle), "--dtype", args.dtype, "--force"]
    if args.quantize:
        command += ["--quantize", args.quantize]
    command += ["--cache", args.cache]
    if args.cache != "dynamic":
        command += ["--max-length", str(max(args.context) + args.steps + 1)]
    result = {"machine": platform.machine(), "shape": args.shape, "checkpoint": checkpoint.name, "bundle": name}
    if (bundle / "manifest.json").is_file():
        result["convert"] = "reused the bundle already there"
    else:
        measured = run_measured(command)
        if measured.returncode:
            raise SystemExit(f"convert failed ({measured.returncode})")
        result["convert_seconds"] = round(measured.seconds, 1)
        result["convert_peak_anon_gib"] = gib(measured.peak_anon_bytes)
    result["bundle_gib"] = gib(sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()))
    if args.validate:
        report = args.work / f"{name}-validate.json"
        measured = run_measured([*CLI, "validate", str(bundle), "--provider", "cpu", "--report", str(report)])
        verdict = json.loads(report.read_text()) if report.is_file() else {}
        result["validate"] = verdict.get("verdict", f"exit {measured.returncode}")
        result["validate_reference"] = verdict.get("reference")
        result["validate_seconds"] = round(measured.seconds, 1)
        result["validate_peak_anon_gib"] = gib(measured.peak_anon_bytes)
    if args.decode:
        speeds = {ctx: round(decode_speed(bundle, ctx, args.steps), 2) for ctx in args.context}
        result["decode_tokens_per_second"] = speeds
    print(json.dumps(result), flush=True)
    if args.drop:
        shutil.rmtree(bundle)


if __name__ == "__main__":
    main()
