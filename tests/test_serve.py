"""`parscale-export serve` end to end: a local Ray Serve on 127.0.0.1, started once per bundle
through the real command line (the default in-place cache at P=4, prefilled 4 tokens a step,
and at P=1; contract v1 at P=4), answers concurrent requests of different lengths with exactly
the tokens of offline `generate`, refuses bad requests with 400 naming the field, refuses a full
queue with 503, keeps serving, and stops without leaving a process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import CONFORMANCE, TINY
from parscale_export.cli.main import main

from parscale_export.export import ExportOptions, convert
from parscale_export.generate import Sampling, generate
from parscale_export.runtime import Runtime, cuda_available

pytest.importorskip("ray.serve")

MAX_BATCH, MAX_QUEUE = 4, 16
START_TIMEOUT_S = 240
GREEDY = Sampling()


class Server:
    def __init__(self, bundle: Path, log: Path, options: tuple[str, ...] = ()) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.bundle, self.log = bundle, log
        command = [sys.executable, "-m", "parscale_export.cli", "serve", str(bundle), "--port", str(self.port)]
        command += ["--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--threads", "1", *options]
        # Its own process group, as a shell gives a foreground job: Ctrl-C is SIGINT to the group.
        self.process = subprocess.Popen(command, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._healthy():
            assert self.process.poll() is None, f"serve exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start in {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as reply:
            return reply.status, json.loads(reply.read())

    def post(self, body: dict | bytes, timeout: float = 120) -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=data)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                text = reply.read().decode()
                return reply.status, text if reply.headers.get_content_type() == "text/event-stream" else json.loads(
                    text
                )
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# kind -> (checkpoint, convert --cache, serve options). The in-place bundles are converted as
# `convert` does by default: contract v3, max_length the model's context (512 and 128 tokens).
SERVERS = {
    "p4": (TINY, None, ("--prefill-chunk", "4")),
    "p1": (CONFORMANCE / "p1_plain_mqa", None, ()),
    "p4-v1": (TINY, "dynamic", ()),
}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, bundle, tmp_path_factory):
    checkpoint, cache, options = SERVERS[request.param]
    if cache is None:
        path = tmp_path_factory.mktemp("bundle") / f"{checkpoint.name}-default"
        convert(checkpoint, path, ExportOptions())
    else:
        path = bundle(checkpoint, cache=cache)
    running = Server(path, tmp_path_factory.mktemp("serve") / "serve.log", options)
    running.runtime = Runtime(path)
    running.kind = request.param
    yield running
    running.stop()


def offline(server: Server, prompt: list[int], max_tokens: int, sampling: Sampling = GREEDY) -> list[int]:
    manifest = server.runtime.manifest
    return generate(server.runtime, [prompt], max_tokens, manifest.eos_ids, sampling, manifest.pad_id)[0]


def test_what_cannot_be_served_fails_before_ray_starts(bundle, tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(bundle(TINY, "bf16")), "--in-session"]) == 2
    assert "bfloat16" in capsys.readouterr().err
    assert main(["serve", str(bundle(TINY, cache="gqa")), "--prefill-chunk", "-1", "--in-session"]) == 2
    if not cuda_available():
        assert main(["serve", str(bundle(TINY, cache="gqa")), "--provider", "cuda", "--in-session"]) == 2
        assert "CUDA requested" in capsys.readouterr().err


def test_sixteen_concurrent_greedy_requests_get_the_offline_tokens(server: Server) -> None:
    vocab = server.runtime.contract.vocab_size
    jobs = [([(7 * i + 3 * j) % vocab for j in range(1 + (5 * i) % 13)], 4 + (3 * i) % 11) for i in range(16)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(
            pool.map(lambda job: server.post({"prompt": job[0], "max_tokens": job[1], "temperature": 0}), jobs)
        )
    for (prompt, max_tokens), (status, body) in zip(jobs, replies, strict=True):
        assert status == 200, body
        (choice,) = body["choices"]
        assert choice["token_ids"] == offline(server, prompt, max_tokens), f"prompt {prompt}"
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] == len(choice["token_ids"])


def test_streaming_sampling_text_and_several_prompts(server: Server) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=5)
    status, body = server.post(
        {"prompt": [3, 1, 4, 1, 5], "max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 5}
    )
    assert status == 200
    assert body["choices"][0]["token_ids"] == offline(server, [3, 1, 4, 1, 5], 9, sampling)

    status, events = server.post({"prompt": [[2, 7], [1, 8, 2, 8]], "max_tokens": 6, "temperature": 0, "stream": True})
    assert status == 200 and events.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    for index, prompt in enumerate([[2, 7], [1, 8, 2, 8]]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [t for c in mine for t in c["token_ids"]] == offline(server, prompt, 6)
        assert mine[-1]["finish_reason"] in ("stop", "length")

    if server.kind.startswith("p4"):  # the tiny checkpoint ships a tokenizer
        status, body = server.post({"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert status == 200 and isinstance(body["choices"][0]["text"], str)
    status, models = server.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == server.bundle.name


BAD = [
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"prompt": [1] * 600}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": 600}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": "many"}, "max_tokens"),
    ({"prompt": [1, 2], "temperature": [1]}, "temperature"),
    ({"prompt": None}, "prompt"),
    (b"{not json", None),
]


def test_bad_requests_get_400_naming_the_field_and_serving_goes_on(server: Server) -> None:
    for body, param in BAD:
        status, reply = server.post(body)
        assert status == 400, (body, reply)
        assert reply["error"]["param"] == param, (body, reply)
        assert reply["error"]["message"]
    status, reply = server.post({"prompt": [5, 6], "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["choices"][0]["token_ids"] == offline(server, [5, 6], 3)


def test_a_full_queue_gets_503_not_a_crash(server: Server) -> None:
    body = {"prompt": [9], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(48) as pool:
        replies = list(pool.map(lambda _: server.post(body), range(48)))
    statuses = [status for status, _ in replies]
    # 48 at once against 4 rows and 16 places in the queue: some must be refused (how many
    # depends on how fast the rows free up), and every other one runs to the end.
    assert set(statuses) == {200, 503}, statuses
    for status, reply in replies:
        if status == 503:
            assert reply["error"]["type"] == "server_busy"
        else:
            assert len(reply["choices"][0]["token_ids"]) == 100
    status, reply = server.post({"prompt": [9], "max_tokens": 5, "temperature": 0})
    assert status == 200 and reply["choices"][0]["token_ids"] == offline(server, [9], 5)
    assert server.get("/health")[1]["waiting"] == 0


def test_stopping_leaves_no_process_behind(server: Server) -> None:
    """Last in the module: Ctrl-C (SIGINT to the process group) for one server, SIGTERM to the
    command alone for the other; then no process the command started may remain."""
    started = server.processes()
    names = " ".join(p.name() for p in started)
    assert "raylet" in names and "gcs_server" in names, names
    if server.kind.startswith("p4"):
        os.killpg(server.process.pid, signal.SIGINT)
    else:
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=120) == 0, server.log.read_text()
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
