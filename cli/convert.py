"""`parscale-export convert`: checkpoint directory -> ONNX bundle."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.bundle import human_size, read_manifest
from parscale_export.contract import CACHE_NAMES
from parscale_export.export import DEFAULT_MAX_LENGTH, EXPORT_DTYPES, GENAI_CACHE, ExportOptions, convert
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
            help="Also make the bundle loadable by onnxruntime-genai (cache seen as [batch, P*kv, seq, d]); "
            f"the cache is --cache {GENAI_CACHE} unless --cache says otherwise.",
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
            help="ONNX opset, contract v1 only (--cache static and gqa take theirs: 24 and 23). 23, the "
            "default: fused Attention and RMSNormalization (onnxruntime >= 1.23). 18-22: the same model from "
            "MatMul, Softmax, ReduceMean... for older runtimes (18: onnxruntime >= 1.15).",
        ),
    ] = None,
    cache: Annotated[
        Cache | None,
        typer.Option(
            help="dynamic: contract v1, the cache grows by concatenation. static: contract v2, fixed "
            "buffers of --max-length tokens written in place (faster decoding at long contexts). gqa: contract "
            "v3, the same buffers read by ONNX Runtime's GroupQueryAttention, which reads only the filled slots: "
            "the fastest in onnxruntime-genai, whose buffer is a request's max_length (ONNX Runtime only; a "
            f"chunked prefill goes one sequence at a time).  [default: dynamic; {GENAI_CACHE} with --genai]",
            show_default=False,
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --cache static or gqa: the most tokens (prompt + generated) one sequence may hold.  "
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
    result = run(checkpoints[0] if len(checkpoints) == 1 else checkpoints, output, options, force=force, log=log)
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
        f"cache={options.cache} (contract v{manifest.contract.version}" + (f", max_length {limit})" if limit else ")")
    )
    cuda_only = " --provider cuda" if dtype.value == "bf16" else ""
    typer.echo(f"next: parscale-export validate {result.out_dir}{cuda_only}")
