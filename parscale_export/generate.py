"""Text generation over a Stepper: left-padded batches, greedy or sampled, EOS, streaming.

No torch: this runs on ONNX Runtime with numpy alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .stepping import Stepper


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, L] and mask [B, L] with each prompt right-aligned (left padding, mask 0)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(sampling.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = np.cumsum(sorted_probs, -1) - sorted_probs >= sampling.top_p
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(
    engine: Stepper,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens per prompt. A row stops after an EOS token (kept in its output) or at
    `max_new_tokens`; `on_token(row, token)` is called as each token is chosen."""
    ids, mask = left_pad(prompts, pad_id)
    rng = np.random.default_rng(sampling.seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    logits, state = engine.prefill(ids, mask, reserve=max_new_tokens - 1)
    for step in range(max_new_tokens):
        tokens = choose(logits[:, -1], sampling, rng)
        for row in np.flatnonzero(~done):
            outputs[row].append(int(tokens[row]))
            if on_token:
                on_token(int(row), int(tokens[row]))
        done |= np.isin(tokens, list(eos_ids))
        if done.all() or step == max_new_tokens - 1:
            break
        logits, state = engine.extend(np.where(done, pad_id, tokens)[:, None], state)
    return outputs
