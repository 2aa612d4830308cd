"""Timing of prefill and greedy decode over any Stepper (ONNX Runtime or the PyTorch reference).

Numbers are returned as data; scripts and commands print them side by side with ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ParScaleExportError
from .stepping import Stepper


class BenchError(ParScaleExportError):
    """A measuring process failed."""


@dataclass(frozen=True)
class Timing:
    batch: int
    prompt_length: int
    steps: int
    prefill_seconds: float
    decode_seconds: float
    tokens: np.ndarray  # [batch, steps] greedy tokens, to check engines agree

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch * self.prompt_length / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch * self.steps / self.decode_seconds


def time_generation(
    engine: Stepper,
    vocab: int,
    batch: int = 1,
    prompt_length: int = 64,
    steps: int = 32,
    seed: int = 0,
    repeats: int = 3,
) -> Timing:
    """Prefill a random prompt, then `steps` greedy decode steps. One warm-up run, then the
    fastest of `repeats` runs for each phase (these machines are noisy; the minimum is the
    most repeatable statistic)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, prompt_length), dtype=np.int64)
    mask = np.ones_like(ids)
    engine.greedy(ids[:, :8], mask[:, :8], steps=2)  # warm-up: first-run allocations, kernel selection
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        logits, state = engine.prefill(ids, mask, reserve=steps)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        tokens = [logits[:, -1].argmax(-1)]
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = engine.extend(tokens[-1][:, None], state)
            tokens.append(logits[:, -1].argmax(-1))
        best_decode = min(best_decode, time.perf_counter() - start)
    return Timing(batch, prompt_length, steps, best_prefill, best_decode, np.stack(tokens[1:], axis=1))


@dataclass(frozen=True)
class Measurement:
    """One engine on one bundle at one batch size, measured in a process of its own."""

    engine: str  # "onnxruntime" or "pytorch"
    bundle: str
    parscale_n: int
    timing: Timing
    peak_rss_bytes: int  # of the measuring process: the engine, its weights and its runtime


def measure(
    engine: str,
    bundle: Path,
    checkpoint: Path | None = None,
    batch: int = 1,
    prompt_length: int = 64,
    steps: int = 32,
    threads: int = 2,
    provider: str = "cpu",
    parallel: int | None = None,
) -> Measurement:
    """Measure in a fresh Python process, so peak memory and import cost belong to this engine
    alone (the ONNX Runtime side never imports torch). `parallel` picks one P of a family bundle."""
    job = dict(engine=engine, bundle=str(bundle), checkpoint=str(checkpoint) if checkpoint else None, batch=batch,
               prompt_length=prompt_length, steps=steps, threads=threads, provider=provider,
               parallel=parallel)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "parscale_export.bench", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"measuring {engine} on {bundle} failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timing = Timing(batch, prompt_length, steps, result["prefill_seconds"], result["decode_seconds"],
                    np.array(result["tokens"]))  # fmt: skip
    return Measurement(engine, str(bundle), result["parscale_n"], timing, result["peak_rss_bytes"])


def _worker(job: dict) -> dict:
    """The child's side of `measure`."""
    import resource

    from .bundle import read_manifest

    manifest = read_manifest(Path(job["bundle"]), job["parallel"])
    if job["engine"] == "onnxruntime":
        from .runtime import Runtime

        stepper: Stepper = Runtime(
            Path(job["bundle"]), provider=job["provider"], threads=job["threads"], parallel=job["parallel"]
        )
    else:
        import torch

        from .reference import Reference

        torch.set_num_threads(job["threads"])
        stepper = Reference.from_checkpoint(Path(job["checkpoint"] or manifest.source_checkpoint))
    t = time_generation(stepper, manifest.contract.vocab_size, job["batch"], job["prompt_length"], job["steps"])
    return {
        "parscale_n": manifest.contract.parscale_n,
        "prefill_seconds": t.prefill_seconds,
        "decode_seconds": t.decode_seconds,
        "tokens": t.tokens.tolist(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
    }


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
