"""Timing of prefill and greedy decode over any Stepper (ONNX Runtime or the PyTorch reference).

Numbers are returned as data; scripts and commands print them side by side with ratios.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .stepping import Stepper


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
    engine: Stepper, vocab: int, batch: int = 1, prompt_length: int = 64, steps: int = 32, seed: int = 0
) -> Timing:
    """Prefill a random prompt, then `steps` greedy decode steps; one warm-up run first."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, prompt_length), dtype=np.int64)
    mask = np.ones_like(ids)
    engine.greedy(ids[:, :8], mask[:, :8], steps=2)  # warm-up: first-run allocations, kernel selection
    start = time.perf_counter()
    logits, state = engine.prefill(ids, mask)
    prefill = time.perf_counter() - start
    tokens = [logits[:, -1].argmax(-1)]
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = engine.extend(tokens[-1][:, None], state)
        tokens.append(logits[:, -1].argmax(-1))
    decode = time.perf_counter() - start
    return Timing(batch, prompt_length, steps, prefill, decode, np.stack(tokens[1:], axis=1))
