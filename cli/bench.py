"""`parscale-export bench`: ONNX Runtime and the PyTorch reference side by side, with ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.bench import Measurement, measure
from parscale_export.bundle import read_manifest
from parscale_export.environment import device_name, package_versions
from parscale_export.errors import UsageError
from parscale_export.runtime import resolve_provider

from .validate import Provider


def bench_command(
    bundles: Annotated[
        list[Path],
        typer.Argument(
            help="One or more bundles; several with different P, or one family bundle, give a P-scaling table."
        ),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint for the PyTorch side (one bundle only). Default: the manifest's source."),
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch sizes to measure; repeat the option. Default: 1 and 4.")
    ] = None,
    prompt_length: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Prompt tokens for the prefill; repeat for step time vs context. Default: 64."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Greedy decode steps timed.")] = 32,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for both engines.")] = 2,
    provider: Annotated[
        Provider, typer.Option(help="ONNX Runtime provider; the PyTorch side runs on CPU.")
    ] = Provider.auto,
    reference: Annotated[
        bool, typer.Option(help="Also time the PyTorch reference (--no-reference: ONNX Runtime only).")
    ] = True,
    parallel: Annotated[
        list[int] | None,
        typer.Option(min=1, help="For a family bundle: the P to measure; repeat the option. Default: every P."),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="Repeat the whole sweep; each cell keeps its fastest round (for a shared, noisy machine)."
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as one JSON object.")] = False,
) -> None:
    """Time prefill and greedy decode: ONNX Runtime vs the PyTorch reference, in one run.

    Each engine runs in a fresh process, so its peak memory is its own. Ratios are
    ONNX Runtime over PyTorch (higher is better for ONNX Runtime); with several bundles the
    decode step time of each P is divided by that of the smallest P; with several prompt
    lengths, each bundle's decode step time is divided by that at the shortest prompt.
    Bundles are measured one after another at each prompt length, so they share the
    machine's mood.

    Examples:

        parscale-export bench ./bundle-p1 ./bundle-p4 ./bundle-p8 --batch 1 --batch 8

        parscale-export bench ./v1 ./v2 --batch 1 --prompt-length 64 --prompt-length 2048 --no-reference
        parscale-export bench ./family --batch 1
    """
    runs: list[tuple[Path, int | None]] = []  # (bundle, P of a family bundle or None)
    for path in bundles:
        manifest = read_manifest(path)  # fail early, with the usual message, on a bad bundle
        if manifest.family:
            for size in parallel or manifest.family:
                read_manifest(path, size)
                runs.append((path, size))
        else:
            runs.append((path, None))
    if checkpoint and len(runs) > 1:
        raise UsageError("--checkpoint applies to one bundle; with several, each uses its manifest's source")
    batches = batch or [1, 4]
    lengths = prompt_length or [64]
    ort_provider = resolve_provider(provider.value)
    log = (lambda _: None) if as_json else (lambda m: typer.echo(m, err=True))
    cells = [
        (engine, path, member, size, length)
        for length in lengths
        for path, member in runs
        for size in batches
        for engine in (("onnxruntime", "pytorch") if reference else ("onnxruntime",))
    ]
    best: dict[tuple, Measurement] = {}
    for round_ in range(rounds):
        for cell in cells:
            engine, path, member, size, length = cell
            where = f"{path} P={member}" if member else str(path)
            log(f"measuring {engine} on {where} (batch {size}, prompt {length}, round {round_ + 1}/{rounds})")
            m = measure(engine, path, checkpoint, size, length, steps, threads, ort_provider, member)
            if cell not in best or m.timing.decode_seconds < best[cell].timing.decode_seconds:
                best[cell] = m
    results = [best[cell] for cell in cells]
    machine = {
        "device": device_name(ort_provider),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "provider": ort_provider,
        "versions": package_versions("onnxruntime-gpu", "onnxruntime", "torch"),
    }
    if as_json:
        typer.echo(json.dumps({"machine": machine, "measurements": [_row(m) for m in results]}, indent=2))
        return
    typer.echo(
        f"machine: {machine['device']}, {threads} of {machine['cpu_count']} threads, ORT on {ort_provider.upper()}"
    )
    typer.echo(f"{steps} greedy decode steps after each prompt")
    typer.echo("bundle                    P batch prompt engine       prefill tok/s decode tok/s  ms/step  peak RSS")
    for m in results:
        t = m.timing
        name = Path(m.bundle).name[:24]
        step_ms = 1e3 * t.decode_seconds / t.steps
        typer.echo(
            f"{name:24s} {m.parscale_n:2d} {t.batch:5d} {t.prompt_length:6d} {m.engine:12s} "
            f"{t.prefill_tokens_per_second:13.1f} {t.decode_tokens_per_second:12.1f} {step_ms:8.2f} "
            f"{m.peak_rss_bytes / 2**20:5.0f} MiB"
        )
    if reference:
        typer.echo("ratios, ONNX Runtime / PyTorch:")
        for ort_run, torch_run in zip(results[0::2], results[1::2], strict=True):
            a, b = ort_run.timing, torch_run.timing
            prefill = a.prefill_tokens_per_second / b.prefill_tokens_per_second
            decode = a.decode_tokens_per_second / b.decode_tokens_per_second
            same = "same" if (a.tokens == b.tokens).all() else "DIFFERENT"
            name = Path(ort_run.bundle).name[:24]
            typer.echo(
                f"  {name:24s} batch {a.batch} prompt {a.prompt_length}: prefill {prefill:.2f}x, "
                f"decode {decode:.2f}x, greedy tokens {same}"
            )
    runs = [m for m in results if m.engine == "onnxruntime"]
    for length in lengths:
        _p_scaling([m for m in runs if m.timing.prompt_length == length], batches, length)
    _context_scaling(runs, bundles, batches)


def _p_scaling(runs: list[Measurement], batches: list[int], length: int) -> None:
    if len({m.parscale_n for m in runs}) < 2:
        return
    typer.echo(f"P scaling, ONNX Runtime decode step time relative to the smallest P (prompt {length}):")
    for size in batches:
        rows = sorted((m for m in runs if m.timing.batch == size), key=lambda m: m.parscale_n)
        base = rows[0].timing.decode_seconds
        cells = ", ".join(f"P={m.parscale_n} {m.timing.decode_seconds / base:.2f}x" for m in rows)
        typer.echo(f"  batch {size}: {cells}")


def _context_scaling(runs: list[Measurement], bundles: list[Path], batches: list[int]) -> None:
    """Decode ms/step against the prompt length, and its ratio to the shortest prompt's."""
    if len({m.timing.prompt_length for m in runs}) < 2:
        return
    typer.echo("step time vs context, ONNX Runtime decode ms/step (ratio to the shortest prompt):")
    for path in bundles:
        for size in batches:
            rows = sorted(
                (m for m in runs if m.bundle == str(path) and m.timing.batch == size),
                key=lambda m: m.timing.prompt_length,
            )
            base = rows[0].timing.decode_seconds
            cells = ", ".join(
                f"{m.timing.prompt_length}: {1e3 * m.timing.decode_seconds / m.timing.steps:.2f}"
                f" ({m.timing.decode_seconds / base:.2f}x)"
                for m in rows
            )
            typer.echo(f"  {path.name[:24]} batch {size}: {cells}")


def _row(m: Measurement) -> dict:
    t = m.timing
    return {
        "engine": m.engine,
        "bundle": m.bundle,
        "parscale_n": m.parscale_n,
        "batch": t.batch,
        "prompt_length": t.prompt_length,
        "steps": t.steps,
        "prefill_tokens_per_second": t.prefill_tokens_per_second,
        "decode_tokens_per_second": t.decode_tokens_per_second,
        "decode_ms_per_step": 1e3 * t.decode_seconds / t.steps,
        "peak_rss_bytes": m.peak_rss_bytes,
        "tokens": t.tokens.tolist(),
    }
