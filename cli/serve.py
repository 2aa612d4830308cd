"""`parscale-export serve`: the bundle behind an OpenAI-compatible API on Ray Serve."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.bundle import read_manifest
from parscale_export.errors import UsageError
from parscale_export.rows import DEFAULT_PREFILL_CHUNK
from parscale_export.supervise import run_in_own_session

from .validate import Provider


def serve_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `parscale-export convert`.")],
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas, each with its own runtime and batch.")] = 1,
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster ('auto' or HOST:PORT) instead of starting a local Ray."),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together per replica.")] = 16,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Sequences that may wait for a row per replica; more get HTTP 503.")
    ] = 64,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            min=0,
            help="In-place bundles (the default): prompt tokens prefilled per step while others decode (times "
            "the requests waiting per running one), so a long prompt does not stall them (0: no limit).",
        ),
    ] = DEFAULT_PREFILL_CHUNK,
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads per replica (0: its default).")] = 0,
    replica_cpus: Annotated[float, typer.Option(min=0.0, help="CPUs Ray reserves for each replica.")] = 1.0,
    provider: Annotated[Provider, typer.Option(help="auto: CUDA when usable, else CPU.")] = Provider.auto,
    model_name: Annotated[
        str | None, typer.Option(help="Model id in the API (default: the bundle directory's name).")
    ] = None,
    in_session: Annotated[bool, typer.Option("--in-session", hidden=True)] = False,
) -> None:
    """Serve a bundle: POST /v1/completions (OpenAI-compatible; "stream": true for server-sent
    events), GET /v1/models, GET /health. Requests are batched continuously in each replica:
    with the in-place cache (the default) each request owns a row of buffers allocated once
    (--max-batch rows), and nothing moves when another request joins or leaves.

    Runs until Ctrl-C or SIGTERM, then stops the replicas and the Ray instance it started
    (exit code 0).

    Examples:

        parscale-export serve ./bundle --port 8000

        parscale-export serve ./bundle --address auto --replicas 4 --host 0.0.0.0
    """
    read_manifest(bundle)  # a bad bundle fails here, before any process starts
    if not in_session:
        # The server proper runs in a process session of its own (see parscale_export.supervise).
        settings = {
            "host": host,
            "port": port,
            "replicas": replicas,
            "address": address,
            "max-batch": max_batch,
            "max-queue": max_queue,
            "prefill-chunk": prefill_chunk,
            "threads": threads,
            "replica-cpus": replica_cpus,
            "provider": provider.value,
            "model-name": model_name,
        }
        options = [f"--{name}={value}" for name, value in settings.items() if value is not None]
        command = [sys.executable, "-m", "parscale_export.cli", "serve", *options, "--in-session", str(bundle)]
        code, stopped = run_in_own_session(command)
        raise typer.Exit(0 if stopped and code in (0, -signal.SIGTERM) else code)
    try:
        from parscale_export.serve import ServeOptions, serve_until_stopped
    except ImportError as exc:
        raise UsageError(
            f"serve needs Ray Serve ({exc}); install it with: pip install 'parscale-export[serve]'"
        ) from None
    options = ServeOptions(
        bundle=bundle.resolve(),
        host=host,
        port=port,
        replicas=replicas,
        address=address,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        threads=threads,
        replica_cpus=replica_cpus,
        provider=provider.value,
        model_name=model_name,
    )
    serve_until_stopped(options, lambda line: typer.echo(line, err=True))
