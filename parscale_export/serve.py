"""`parscale-export serve`: a bundle behind an OpenAI-compatible HTTP API on Ray Serve.

Ray Serve owns the replicas, the HTTP proxy and the routing between them, on one machine or a
whole Ray cluster. Each replica is one Runtime with one batcher stepping in a thread of its own:
requests join and leave the running batch at step boundaries. Which batcher is the contract's
choice (rows.batcher_for): an in-place cache (v2, v3, what `convert` writes by default) gives
each request a row of buffers allocated once (rows.py); contract v1 merges the running
sequences' caches on the host (batching.py). This module only translates: HTTP bodies to
batcher requests (completions.py checks them), tokens to JSON or server-sent events, QueueFull
to 503. No torch and no model logic.
"""

import asyncio
import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from .batching import ERROR, QueueFull, Request, Ticket
from .bundle import read_manifest
from .completions import (
    DONE_EVENT,
    Completion,
    ModelInfo,
    RequestError,
    choice,
    chunk_event,
    completion_body,
    error_body,
    parse_completion,
)
from .errors import BundleError, ServeError
from .rows import DEFAULT_PREFILL_CHUNK, batcher_for
from .runtime import Runtime, resolve_provider
from .text import TextStream, load_tokenizer

APP_NAME = "parscale-export"
LOCAL_OBJECT_STORE = 128 << 20  # nothing large travels through Ray's object store here

api = FastAPI(title="parscale-export")


@dataclass(frozen=True)
class ServeOptions:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    address: str | None = None  # None: start a local Ray; else join this cluster ("auto", "host:6379")
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # in-place bundles: prompt tokens per step (0: no limit)
    threads: int = 0  # ONNX Runtime intra-op threads per replica; 0: its default
    replica_cpus: float = 1.0
    provider: str = "auto"
    model_name: str | None = None

    @property
    def name(self) -> str:
        return self.model_name or Path(self.bundle).resolve().name


def _requests(completion: Completion, events: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> list[Request]:
    """One batcher request per prompt; its callbacks (run in the batcher's thread) post
    (choice, token, finish) events to this request's queue on the server's event loop."""

    def post(*event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    return [
        Request(
            prompt,
            completion.max_tokens,
            completion.sampling,
            completion.ignore_eos,
            on_token=lambda token, i=i: post(i, token, None),
            on_finish=lambda reason, detail, i=i: post(i, None, (reason, detail)),
        )
        for i, prompt in enumerate(completion.prompts)
    ]


class _Reply:
    """The events of one HTTP request's tickets, as one JSON body or as a stream."""

    def __init__(self, model: str, completion: Completion, tickets: list[Ticket], events: asyncio.Queue, tokenizer):
        self.model, self.completion, self.tickets, self.events = model, completion, tickets, events
        self.tokenizer = tokenizer
        self.ident, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    async def _events(self) -> AsyncIterator[tuple[int, int | None, tuple[str, str] | None]]:
        """Every event until each choice has finished; cancels the tickets if the client goes."""
        unfinished = len(self.tickets)
        try:
            while unfinished:
                event = await self.events.get()
                unfinished -= event[2] is not None
                yield event
        finally:
            for ticket in self.tickets:
                ticket.cancel()

    async def whole(self) -> JSONResponse:
        events = self._events()
        try:
            async for _ in events:
                pass
        finally:  # a client that went away cancels its tickets now, not when the generator is collected
            await events.aclose()
        failed = [t for t in self.tickets if t.finish_reason == ERROR]
        if failed:
            return JSONResponse(error_body("generation failed", None, "server_error"), status_code=500)
        choices = [
            choice(i, self.tokenizer.decode(t.tokens) if self.tokenizer else "", t.tokens, t.finish_reason)
            for i, t in enumerate(self.tickets)
        ]
        prompt_tokens = sum(len(p) for p in self.completion.prompts)
        return JSONResponse(completion_body(self.ident, self.created, self.model, choices, prompt_tokens))

    async def stream(self) -> AsyncIterator[str]:
        texts = [TextStream(self.tokenizer) if self.tokenizer else None for _ in self.tickets]
        async for index, token, finish in self._events():
            if finish is not None:
                reason, detail = finish
                if reason == ERROR:
                    yield f"data: {json.dumps(error_body(f'generation failed: {detail}', None, 'server_error'))}\n\n"
                    continue
                yield chunk_event(self.ident, self.created, self.model, choice(index, "", [], reason))
                continue
            piece = texts[index].push(token) if texts[index] else ""
            yield chunk_event(self.ident, self.created, self.model, choice(index, piece, [token], None))
        yield DONE_EVENT


@serve.deployment
@serve.ingress(api)
class CompletionServer:
    """One replica: a Runtime over the bundle and a batcher that steps in its own thread."""

    def __init__(self, options: ServeOptions) -> None:
        runtime = Runtime(options.bundle, provider=options.provider, threads=options.threads or None)
        manifest, contract = runtime.manifest, runtime.contract
        context = manifest.context_length
        if contract.cache.in_place:  # a sequence never holds more than the buffers' max_length
            context = min(context or contract.max_length, contract.max_length)
        self.model = ModelInfo(options.name, contract.vocab_size, context)
        self.tokenizer = load_tokenizer(options.bundle)
        self.batcher = batcher_for(
            runtime,
            contract,
            manifest.eos_ids,
            manifest.pad_id,
            options.max_batch,
            options.max_queue,
            options.prefill_chunk,
        )
        self.stepping = threading.Thread(target=self.batcher.run, name="batcher", daemon=True)
        self.stepping.start()
        self.created = int(time.time())

    def __del__(self) -> None:  # Ray Serve calls this when it stops a replica
        if hasattr(self, "batcher"):
            self.batcher.close()

    @api.get("/health")
    def health(self) -> JSONResponse:
        running, waiting = self.batcher.load
        alive = self.stepping.is_alive()
        body = {"status": "ok" if alive else "batcher stopped", "running": running, "waiting": waiting}
        return JSONResponse(body, status_code=200 if alive else 503)

    @api.get("/v1/models")
    def models(self) -> dict:
        card = {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "parscale-export"}
        return {"object": "list", "data": [card | {"max_model_len": self.model.context_length}]}

    @api.post("/v1/completions")
    async def completions(self, http: HttpRequest):
        encode = (lambda text: self.tokenizer.encode(text).ids) if self.tokenizer else None
        try:
            completion = parse_completion(await http.body(), self.model, encode)
        except RequestError as exc:
            return JSONResponse(error_body(str(exc), exc.param), status_code=400)
        events: asyncio.Queue = asyncio.Queue()
        try:
            tickets = self.batcher.submit(_requests(completion, events, asyncio.get_running_loop()))
        except QueueFull as exc:
            return JSONResponse(error_body(f"server busy: {exc}", None, "server_busy"), status_code=503)
        reply = _Reply(self.model.name, completion, tickets, events, self.tokenizer)
        if completion.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await reply.whole()


def serve_until_stopped(options: ServeOptions, log: Callable[[str], None]) -> None:
    """Start (or join) Ray, run the application, block until SIGINT or SIGTERM, then stop what
    this call started: the application always, the local Ray instance when it started one."""
    manifest = read_manifest(options.bundle)  # a bad bundle fails here, before any process starts
    if manifest.contract.dtype == "bfloat16":
        raise BundleError(
            f"{options.bundle}: serve allocates (in-place cache) or moves (--cache dynamic) its cache through "
            "numpy, which has no bfloat16 type; convert with --dtype fp16 or fp32 to serve"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = options.address is None
    if local:  # the replicas run here: a provider that cannot start fails now, with its reason
        resolve_provider(options.provider)
    cpus = max(os.cpu_count() or 1, math.ceil(options.replicas * options.replica_cpus))
    log("starting a local Ray instance" if local else f"joining the Ray cluster at {options.address}")
    try:
        ray.init(
            address="local" if local else options.address,  # "local": never attach to another Ray by accident
            num_cpus=cpus if local else None,
            object_store_memory=LOCAL_OBJECT_STORE if local else None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="warning",
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "start a local Ray" if local else f"join the Ray cluster at {options.address}"
        raise ServeError(f"cannot {where}: {_first_line(exc)}") from None
    # After ray.init, which installs its own SIGTERM handler: both signals unwind to `finally`.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        deployment = CompletionServer.options(
            num_replicas=options.replicas,
            ray_actor_options={"num_cpus": options.replica_cpus},
            # Let every request reach a replica, whose batcher answers 503 past --max-queue.
            max_ongoing_requests=2 * (options.max_batch + options.max_queue) + 8,
        )
        log(f"starting {options.replicas} replica(s) of {options.name}")
        try:
            serve.run(deployment.bind(options), name=APP_NAME, route_prefix="/")
        except Exception as exc:  # Ray reports a replica that failed to start in its own exception types
            raise ServeError(f"the replicas did not start: {_first_line(exc)}") from None
        log(f"serving {options.name} on http://{options.host}:{options.port}/v1 (Ctrl-C or SIGTERM stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass  # asked to stop: not an error
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        log("stopping")
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
                if not serve.status().applications:  # Serve runs nothing else: stop its proxies too
                    serve.shutdown()
        finally:
            ray.shutdown()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
