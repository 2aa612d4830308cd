"""`parscale-export convert`: checkpoint directory -> ONNX bundle."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.bundle import human_size, read_manifest
from parscale_export.contract import CACHE_NAMES
from parscale_export.export import DEFAULT_CACHE, DEFAULT_MAX_LENGTH, EXPORT_DTYPES, ExportOptions, convert
from parscale_export.family import convert_family
from parscale_export.quantize import BITS

# Choices derived from the library's own tables, so the CLI cannot drift from what convert accepts.
DType = StrEnum("DType", list(EXPORT_DTYPES))
Quantization = StrEnum("Quantization", list(BITS))
Cache = StrEnum("Cache", list(CACHE_NAMES))


def convert_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Local checkpoint directory: config.json plus model.safetensors, or shards with their index. "
            "Several checkpoints that share a backbone (each with its own P) make one family bundle.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Bundle directory to create (must be absent or empty).")
    ],
    dtype: Annotated[
        DType,
        typer.Option(
            help="Weights and cache dtype in the graph. fp16 and bf16 are meant for CUDA; bf16 (the released "
            "checkpoints' own dtype) runs on CUDA only: ONNX Runtime's CPU provider has no bfloat16 kernels."
        ),
    ] = DType.fp32,
    genai: Annotated[
        bool,
        typer.Option(
            "--genai",
            help="Also write genai_config.json, so that onnxruntime-genai loads the bundle as it is (the P "
            "streams look like P times the heads to it). The graph then declares its buffers' length, "
            "prefix + --max-length slots: genai allocates exactly that and refuses a longer max_length.",
        ),
    ] = False,
    quantize: Annotated[
        Quantization | None,
        typer.Option(help="Weight-only quantization of the linear layers (ONNX Runtime MatMulNBits)."),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option(
            min=18,
            max=23,
            help="ONNX opset. 23, the default (onnxruntime >= 1.24). 18-22: attention and norms from MatMul, "
            "Softmax, ReduceMean... for older runtimes (18: onnxruntime >= 1.15); they have no in-place cache, "
            "so these imply --cache dynamic.",
        ),
    ] = None,
    cache: Annotated[
        Cache | None,
        typer.Option(
            help="gqa (the default, contract v3): one buffer per layer of prefix + --max-length slots a "
            "sequence, written in place and read by ONNX Runtime's GroupQueryAttention over the slots in use; "
            "decode cost stays nearly flat with context. static (v2): the same buffers under ONNX's Attention, "
            "which reads the whole buffer (faster on the CPU at P=8 when buffers fit the request). dynamic (v1): "
            "the cache is copied into a longer one at every step; for runtimes without the in-place ops (any "
            f"--opset below 23).  [default: {DEFAULT_CACHE}]",
            show_default=False,
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The most tokens (prompt + generated) one sequence may hold in the in-place cache.  "
            f"[default: the model's max_position_embeddings, at most {DEFAULT_MAX_LENGTH}]",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty output directory, once the new bundle is complete.")
    ] = False,
) -> None:
    """Convert a ParScale checkpoint into an ONNX bundle.

    The graph folds the P parallel streams into the batch (row b*P + p is stream p of sequence b)
    and takes the KV cache as explicit inputs (past_key_values.{i}.key/value) and outputs
    (present.{i}.key/value). The learned prefix lives inside the graph, so the first call passes
    an empty past. The bundle holds model.onnx, model.onnx.data, manifest.json and the
    checkpoint's config, generation config and tokenizer files.

    Nothing is downloaded and no code from the checkpoint runs: safetensors only.

    Several checkpoints whose tensors, but for the prefixes and the aggregation layer, are
    bit-for-bit equal become one family bundle: the backbone stored once, one graph per P.
    Choose the P at run time with --parallel (default: the largest).

    Examples:

      parscale-export convert ./ParScale-1.8B-P8 -o ./bundle-p8 --dtype fp16

      parscale-export convert ./Qwen2.5-3B ./ParScale-Qwen-3B-P2-Python ./ParScale-Qwen-3B-P4-Python -o ./family
    """
    start = time.perf_counter()

    def log(message: str) -> None:
        typer.echo(f"[{time.perf_counter() - start:6.1f}s] {message}", err=True)

    options = ExportOptions(
        dtype=dtype.value,
        genai=genai,
        quantize=quantize.value if quantize else None,
        opset=opset,
        cache=cache.value if cache else None,
        max_length=max_length,
    )
    run = convert if len(checkpoints) == 1 else convert_family
    source = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    result = run(source, output, options, force=force, log=log, progress=ProgressBar())
    typer.echo(f"wrote {result.out_dir} in {result.seconds:.1f}s:")
    for name, size in result.files.items():
        typer.echo(f"  {name:28s} {human_size(size):>10s}")
    c, manifest = result.config, read_manifest(result.out_dir)
    if len(checkpoints) > 1:
        sizes = ", ".join(map(str, manifest.family))
        typer.echo(f"family: P = {sizes} over one backbone; choose with --parallel, default (the largest):")
    limit = manifest.contract.max_length
    typer.echo(
        f"P={c.parscale_n} (cache rows = {c.parscale_n} x batch), layers={c.num_layers}, "
        f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={dtype.value}, "
        f"cache={options.cache} (contract v{manifest.contract.version}"
        + (f", max_length {limit})" if limit else ")")
        + (f": {options.note}" if options.note else "")
    )
    cuda_only = " --provider cuda" if dtype.value == "bf16" else ""
    typer.echo(f"next: parscale-export validate {result.out_dir}{cuda_only}")


class ProgressBar:
    """convert's weight write as a bar on stderr: bytes written, rate and time left. Redrawn in
    place on a terminal; otherwise (a log file) one line per tenth."""

    WIDTH = 24
    MIN_SECONDS = 0.5  # before this, no rate or time left

    def __init__(self) -> None:
        self.start = 0.0
        self.last = -1  # bytes at the previous call: a smaller count starts a new write (a family's next member)
        self.tenth = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < self.last or self.last < 0:
            self.start, self.tenth = now, -1
        self.last = done
        tty = sys.stderr.isatty()
        tenth = done * 10 // max(total, 1)
        if not tty and tenth == self.tenth:
            return
        self.tenth = tenth
        filled = done * self.WIDTH // max(total, 1)
        line = f"  [{'#' * filled}{'.' * (self.WIDTH - filled)}] {human_size(done)} of {human_size(total)}"
        elapsed = now - self.start
        if elapsed >= self.MIN_SECONDS and done:  # a rate over the first call's microseconds means nothing
            rate = done / elapsed
            left = int((total - done) / rate)
            line += f", {human_size(rate)}/s, {left // 60}:{left % 60:02d} left"
        if tty:
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
            sys.stderr.flush()
        else:
            typer.echo(line, err=True)
