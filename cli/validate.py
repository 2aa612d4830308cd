"""`parscale-export validate`: ONNX Runtime against the PyTorch reference, with a verdict."""

from __future__ import annotations

import dataclasses
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.bundle import read_manifest
from parscale_export.errors import OutputError, UsageError, ValidationFailed
from parscale_export.validate import HOW, Report, Settings, Thresholds, default_thresholds, run_validation

EP = "ExecutionProvider"


class Way(StrEnum):
    auto = "auto"
    whole = "whole"
    layers = "layers"


class Provider(StrEnum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def validate_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `parscale-export convert`.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint to compare against. Default: the source recorded in the bundle's manifest."),
    ] = None,
    provider: Annotated[
        Provider,
        typer.Option(help="auto: CUDA when a CUDA session really starts, else CPU (said loudly). cuda: CUDA or fail."),
    ] = Provider.auto,
    report: Annotated[Path | None, typer.Option(help="Also write every metric, threshold and version as JSON.")] = None,
    atol: Annotated[
        float | None,
        typer.Option(help="Max |logit error| allowed. Default: 1e-3 fp32; x peak |logit|: 0.02 fp16, 0.05 bf16."),
    ] = None,
    min_top1: Annotated[
        float | None, typer.Option(help="Min top-1 agreement. Default: 1.0 fp32, 0.9 fp16/bf16.")
    ] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Min cosine similarity of logits.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Prompts in the left-padded batch (row b has 2*b pads).")] = 3,
    prompt_length: Annotated[int, typer.Option(min=2, help="Tokens per prompt, padding included.")] = 12,
    decode_steps: Annotated[int, typer.Option(min=1, help="Greedy decode steps after the prefill.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
    parallel: Annotated[
        int | None, typer.Option(min=1, help="For a family bundle: validate this P only (default: every P).")
    ] = None,
    reference: Annotated[
        Way,
        typer.Option(
            help="How the float32 PyTorch reference holds its weights. whole: all in memory (4 bytes a "
            "parameter). layers: each layer's weights read from the checkpoint as it runs (memory: one layer; "
            "slower). auto: layers when the whole model would take over a quarter of the available memory."
        ),
    ] = Way.auto,
) -> None:
    """Check that a bundle computes what the PyTorch reference computes.

    Runs the bundle on ONNX Runtime and the reference (float32 PyTorch, official ParScale
    semantics) on the same left-padded batch: prefill, greedy decode, a chunked prefill
    (past > 0 with several new tokens) and a batch of one. Every ONNX output is also checked
    against the I/O contract. A tolerance failure is a failure: exit code 1.

    Example:

        parscale-export validate ./bundle --provider cuda --report report.json
    """
    manifest = read_manifest(bundle, parallel)
    sizes = [parallel] if parallel or not manifest.family else list(manifest.family)
    if checkpoint and len(sizes) > 1:
        raise UsageError("--checkpoint applies to one P of a family bundle; add --parallel")
    limits = default_thresholds(manifest)
    overrides = {"max_abs": atol, "min_top1": min_top1, "min_cosine": min_cosine}
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    settings = Settings(batch=batch, prompt_length=prompt_length, decode_steps=decode_steps, seed=seed)

    results = []
    for size in sizes:
        if manifest.family:
            typer.echo(f"== P={size}")
        result = run_validation(
            bundle, checkpoint, provider.value, settings, limits, log=lambda m: typer.echo(m, err=True),
            parallel=size, reference_way=reference.value,
        )  # fmt: skip
        _print_table(result)
        results.append(result)
    if report:
        data = results[0].to_dict() if not manifest.family else {"members": [r.to_dict() for r in results]}
        try:
            report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{report}: cannot write the report ({exc.strerror})") from None
        typer.echo(f"report: {report}")
    where = f"{results[0].provider.upper()} ({results[0].device})"
    if results[0].provider == "cpu":
        where += ", not CUDA"
    label = {r.parscale_n: f"P={r.parscale_n} " if manifest.family else "" for r in results}
    reasons = [
        f"{label[r.parscale_n]}{p.name}: {'; '.join(p.failures)}" for r in results for p in r.phases if not p.passed
    ]
    reasons += [f"{label[r.parscale_n]}contract: {c}" for r in results for c in r.contract_problems]
    reasons += [f"{label[r.parscale_n]}placement: {c}" for r in results for c in r.placement_problems]
    if reasons:
        typer.echo(f"FAIL on {where}")
        raise ValidationFailed("validation failed: " + " | ".join(reasons))
    kind = results[0].quantization or results[0].dtype
    what = "the bundle matches" if not manifest.family else f"every P ({', '.join(map(str, sizes))}) matches"
    typer.echo(f"PASS on {where}: {what} the PyTorch reference ({kind} thresholds)")


def _print_table(report: Report) -> None:
    typer.echo(f"reference: PyTorch, {HOW[report.reference]}")
    typer.echo(f"thresholds: {_limits(report.thresholds)}")
    if report.exact_thresholds:
        typer.echo(f"exact phases (float activations, the bundle's weights): {_limits(report.exact_thresholds)}")
    columns = ("positions", 9), ("max|err|", 10), ("mean|err|", 10), ("min cos", 9), ("top-1", 6), ("greedy", 9)
    typer.echo(f"{'phase':22s} " + " ".join(f"{name:>{width}s}" for name, width in columns) + "  result")
    for p in report.phases:
        greedy = {None: "-", True: "same", False: f"DIFF@{p.greedy_agreeing_steps}"}[p.greedy_match]
        typer.echo(
            f"{p.name:22s} {p.positions:9d} {p.max_abs:10.2e} {p.mean_abs:10.2e} {p.min_cosine:9.6f} "
            f"{p.top1:6.3f} {greedy:>9s}  {'ok' if p.passed else 'FAIL'}"
        )
    typer.echo(f"contract: {'ok' if not report.contract_problems else '; '.join(report.contract_problems)}")
    ran = ", ".join(
        f"{op} {'+'.join(f'{n}x{p.removesuffix(EP)}' for p, n in where.items())}"
        for op, where in report.placement.items()
    )
    verdict = "ok" if not report.placement_problems else "FAIL: " + "; ".join(report.placement_problems)
    typer.echo(f"placement: {verdict} ({ran or 'no heavy nodes profiled'})")


def _limits(t: Thresholds) -> str:
    scale = " x peak |logit|" if t.scaled else ""
    return (
        f"max|err| <= {t.max_abs:g}{scale}, cosine >= {t.min_cosine:g}, top-1 >= {t.min_top1:g}, "
        f"greedy must match: {'yes' if t.greedy_must_match else 'no'}"
    )
