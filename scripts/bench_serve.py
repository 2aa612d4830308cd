"""`parscale-export serve` (one replica) under 1, 4 and 16 streaming clients: contract v1's server
against the in-place one, in one run.

Builds the mid-size P=4 checkpoint (vocab 32000, hidden 512, intermediate 1408, 8 layers, 8/2
heads, T=48, a 2560-token context) with parscale_export.synthetic and converts it (fp32) once per
--cache. Then for each server (every --cache; in-place bundles once per --prefill-chunk) it starts
`parscale-export serve` through the command line and, for every workload (prompt tokens + new
tokens) and client count, lets N clients each stream --requests greedy completions back to back
(EOS ignored, so every request makes its tokens). Reported per run: generated tokens/s over all
requests, time to first token (p50, p95) and time per output token (p50 over requests; a
request's TPOT is (last token - first token) / (tokens - 1)), each also as a ratio to the first
server. Then offline `generate` on one static batch of the largest client count's first prompts
(same bundle, same threads, no server) gives each server's bound: "of offline".

`--stall` adds one scenario per server: 4 clients stream 64+128 tokens while one request with a
long prompt (--stall-prompt tokens) joins; the longest gap between two tokens of the running
requests shows how long the join stalled them.

    .venv/bin/python scripts/bench_serve.py [--work build/bench-serve] [--clients 1 4 16]
        [--workload 64+32 --workload 512+256] [--cache dynamic gqa] [--prefill-chunk 256 0]
        [--requests 2] [--threads 1] [--stall]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parscale_export.generate import generate
from parscale_export.runtime import Runtime

SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    parscale_n_tokens=48,
    max_position_embeddings=2560,  # room for 512+256 workloads and a 2,048-token prompt
)


@dataclass(frozen=True)
class Server:
    cache: str
    prefill_chunk: int | None  # None: contract v1, which prefills each boundary's requests in one call

    @property
    def label(self) -> str:
        if self.prefill_chunk is None:
            return f"{self.cache} (v1)"
        return f"{self.cache} chunk {self.prefill_chunk or 'whole'}"


@dataclass(frozen=True)
class Run:
    tokens: int
    seconds: float
    ttft: list[float]  # per request, seconds
    tpot: list[float]  # per request with 2+ tokens, seconds

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/bench-serve"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    parser.add_argument(
        "--workload", action="append", type=workload, help="PROMPT+NEW tokens (default: 64+32 and 512+256)"
    )
    parser.add_argument("--cache", nargs="+", default=["dynamic", "gqa"], help="convert --cache of each server")
    parser.add_argument("--prefill-chunk", type=int, nargs="+", default=[256], help="in-place servers, each")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the replica (and offline)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--stall", action="store_true", help="add the long-prompt join scenario")
    parser.add_argument("--stall-prompt", type=int, default=2048)
    args = parser.parse_args()
    workloads = args.workload or [(64, 32), (512, 256)]
    if os.environ.get("OMP_NUM_THREADS") != "1":
        # Ray starts each replica (--replica-cpus 1) with OMP_NUM_THREADS=1; offline generate runs
        # here under the same setting (unset, it ran 15% slower on the 2-core machine).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_NUM_THREADS": "1"})

    bundles = {cache: prepare(args.work, cache) for cache in args.cache}
    servers = [
        Server(cache, None if cache == "dynamic" else chunk)
        for cache in args.cache
        for chunk in ([None] if cache == "dynamic" else args.prefill_chunk)
    ]
    rng = np.random.default_rng(0)
    prompts = {
        (w, n): rng.integers(0, SHAPE["vocab_size"], (n, args.requests, w[0])).tolist()
        for w in workloads
        for n in args.clients
    }
    print(
        f"mid-size P=4 fp32, one replica, {args.threads} ORT thread(s), max batch {args.max_batch}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average at start "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    results: dict[tuple[str, tuple[int, int], int], Run] = {}
    stalls: dict[str, tuple[float, float, float]] = {}
    for server in servers:
        with serving(bundles[server.cache], server, args) as port:
            for w in workloads:
                # ONNX Runtime's first call at a large shape grows its memory arena (the in-place
                # graph's first [16, 64] prefill took 3x the next one): a burst, not measured.
                warm = rng.integers(0, SHAPE["vocab_size"], (max(args.clients), 1, w[0])).tolist()
                measure(port, warm, 2)
                for n in args.clients:
                    run = measure(port, prompts[w, n], w[1])
                    results[server.label, w, n] = run
                    print(
                        f"  {server.label:<16} {w[0]}+{w[1]:<4} {n:>2} clients: {run.rate:7.1f} tok/s, "
                        f"TTFT p50 {pct(run.ttft, 50):6.2f} s, TPOT p50 {1e3 * pct(run.tpot, 50):6.1f} ms",
                        flush=True,
                    )
            if args.stall:
                stalls[server.label] = stall(port, args.stall_prompt)
    most = max(args.clients)
    offline = {
        (cache, w): offline_rate(bundles[cache], prompts[w, most], w[1], args.threads)
        for cache in args.cache
        for w in workloads
    }

    base = servers[0].label
    print(f"\neach client: {args.requests} streamed greedy requests back to back; ratios against {base}")
    header = f"{'server':<18}{'clients':>7}{'tok/s':>9}{'x':>7}{'TTFT p50':>10}{'TTFT p95':>10}{'TPOT p50':>10}{'x':>7}"
    for w in workloads:
        print(f"\nworkload {w[0]}+{w[1]} (prompt + new tokens)\n{header}{'of offline':>12}")
        for n in args.clients:
            for server in servers:
                run, ref = results[server.label, w, n], results[base, w, n]
                bound = f"{run.rate / offline[server.cache, w]:>11.0%}" if n == most else ""
                print(
                    f"{server.label:<18}{n:>7}{run.rate:>9.1f}{run.rate / ref.rate:>6.2f}x"
                    f"{pct(run.ttft, 50):>9.2f}s{pct(run.ttft, 95):>9.2f}s{1e3 * pct(run.tpot, 50):>8.1f}ms"
                    f"{pct(run.tpot, 50) / pct(ref.tpot, 50):>6.2f}x {bound}"
                )
        for cache in args.cache:
            print(f"offline generate, {cache}, one batch of {most}: {offline[cache, w]:.1f} tok/s")
    if stalls:
        print(f"\n4 clients stream 64+128 while a {args.stall_prompt}-token prompt joins (gaps between their tokens):")
        for label, (p50, longest, ttft) in stalls.items():
            print(f"{label:<18} gap p50 {1e3 * p50:7.1f} ms, longest {longest:6.2f} s; long prompt's TTFT {ttft:.2f} s")
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def workload(text: str) -> tuple[int, int]:
    prompt, new = text.split("+")
    return int(prompt), int(new)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(port: int, prompts: list[list[list[int]]], max_tokens: int) -> Run:
    """Each client (one list of prompts) streams its requests back to back."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        times = list(pool.map(lambda mine: [stream(port, p, max_tokens) for p in mine], prompts))
    seconds = time.perf_counter() - start
    requests = [t for client in times for t in client]
    return Run(
        tokens=sum(map(len, requests)),
        seconds=seconds,
        ttft=[t[0] for t in requests],
        tpot=[(t[-1] - t[0]) / (len(t) - 1) for t in requests if len(t) > 1],
    )


def stall(port: int, prompt_length: int) -> tuple[float, float, float]:
    """(p50 gap, longest gap) between tokens of 4 running requests while a long prompt joins, and
    the long request's time to first token."""
    rng = np.random.default_rng(7)
    short = rng.integers(0, SHAPE["vocab_size"], (4, 64)).tolist()
    long = rng.integers(0, SHAPE["vocab_size"], prompt_length).tolist()
    results: list[list[float]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(stream(port, p, 128))) for p in short]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # the four are decoding
    joined = stream(port, long, 2)
    for thread in threads:
        thread.join()
    gaps = np.concatenate([np.diff(t) for t in results])
    return float(np.median(gaps)), float(gaps.max()), joined[0]


def stream(port: int, prompt: list[int], max_tokens: int) -> list[float]:
    """Seconds from sending one streamed greedy completion to each of its tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode())
    start = time.perf_counter()
    times: list[float] = []
    with urllib.request.urlopen(request, timeout=3600) as reply:
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            times += [time.perf_counter() - start] * len(event["choices"][0]["token_ids"])
    return times


def offline_rate(bundle: Path, prompts: list[list[list[int]]], max_tokens: int, threads: int) -> float:
    """Tokens/s of offline `generate` (prefill included) on one static batch: each client's first
    prompt, the same runtime a replica runs, with no server and no HTTP."""
    runtime = Runtime(bundle, provider="cpu", threads=threads)
    batch = [mine[0] for mine in prompts]
    generate(runtime, batch, 2)  # warm-up at the same shapes, as the servers get
    start = time.perf_counter()
    tokens = generate(runtime, batch, max_tokens)  # no EOS: every row makes max_tokens
    return sum(map(len, tokens)) / (time.perf_counter() - start)


class serving:
    """`parscale-export serve` on a free port for the `with` block, then SIGTERM."""

    def __init__(self, bundle: Path, server: Server, args: argparse.Namespace) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "parscale_export.cli", "serve", str(bundle), "--port", str(self.port)]
        command += ["--threads", str(args.threads), "--max-batch", str(args.max_batch), "--replica-cpus", "1"]
        command += ["--max-queue", "256"]
        if server.prefill_chunk is not None:
            command += ["--prefill-chunk", str(server.prefill_chunk)]
        self.log = (args.work / f"serve-{server.label.replace(' ', '-')}.log").open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> int:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    stream(self.port, [1, 2, 3], 4)  # warm-up
                    return self.port
            except OSError:
                time.sleep(0.5)
        sys.exit("serve did not come up in 300 s")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


def prepare(work: Path, cache: str) -> Path:
    """Checkpoint and bundle, each made once, in child processes: torch stays out of this one,
    whose offline measurement should run as lean as the server's replica."""
    checkpoint, bundle = work / "mid-p4-ctx2560", work / f"mid-p4-ctx2560-fp32-{cache}"
    if not (checkpoint / "config.json").is_file():
        write = (
            "import sys; from pathlib import Path; "
            "from parscale_export.synthetic import parscale_config, write_checkpoint; "
            f"write_checkpoint(Path(sys.argv[1]), parscale_config(parscale_n=4, **{SHAPE!r}), seed=4)"
        )
        subprocess.run([sys.executable, "-c", write, str(checkpoint)], check=True)
    if not (bundle / "manifest.json").is_file():
        print(f"converting the mid-size P=4 checkpoint (fp32, --cache {cache}) ...", flush=True)
        command = [sys.executable, "-m", "parscale_export.cli", "convert", str(checkpoint), "-o", str(bundle)]
        subprocess.run([*command, "--cache", cache, "--force"], check=True, stdout=subprocess.DEVNULL)
    return bundle


if __name__ == "__main__":
    main()
