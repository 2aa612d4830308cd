"""Prefill and decode over any one-call-per-step engine: ONNX Runtime or the PyTorch reference.

Both engines take the contract's inputs and return logits plus the presents; only `run`
differs. Validation drives the two through this one protocol, so they see identical inputs.
Both cache contracts fit it: a growing cache (v1) comes back new from every call; a fixed
buffer (v2) is allocated by `prefill`, sized for the tokens the caller will add, and comes
back as the same object, written in place. A State is therefore valid until the next call
made from it. No torch here: the runtime imports this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class State:
    """What a batch of sequences carries between calls."""

    attention_mask: np.ndarray  # int64 [B, past]: real tokens seen so far (1) and left padding (0)
    past: list[Any]  # per layer key, value, as the engine holds them (the contract says the shape)

    @property
    def past_length(self) -> int:
        return self.attention_mask.shape[1]


def positions(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last `seq` columns: real tokens count from 0, padding sits at 0."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, -seq:].astype(np.int64)


class Stepper(ABC):
    """prefill / extend / greedy on top of one abstract call."""

    @abstractmethod
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One call: logits float32 [B, S, V] and the presents. `attention_mask` covers past + new."""

    @property
    def batched_chunks(self) -> bool:
        """Whether one call may feed several new tokens over a past to several sequences (contract
        v3's GroupQueryAttention feeds one sequence at a time)."""
        return True

    @abstractmethod
    def empty_past(self, batch: int, tokens: int | None = None) -> list[Any]:
        """The first call's cache for `batch` sequences that will hold `tokens` tokens in all
        (None: as many as the engine allows; only a fixed-capacity cache uses the number)."""

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, reserve: int | None = None
    ) -> tuple[np.ndarray, State]:
        """The first call, with an empty past. Left-padded rows carry 0 in the mask. `reserve`:
        how many tokens later calls will add (None: as many as the engine allows)."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        tokens = None if reserve is None else mask.shape[1] + reserve
        past = self.empty_past(mask.shape[0], tokens)
        logits, present = self.run(np.asarray(input_ids, dtype=np.int64), mask, past)
        return logits, State(mask, present)

    def extend(self, input_ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Feed more tokens after `state`: one for a decode step, several for a chunked prefill."""
        batch, seq = input_ids.shape
        mask = np.concatenate([state.attention_mask, np.ones((batch, seq), np.int64)], axis=1)
        logits, present = self.run(np.asarray(input_ids, dtype=np.int64), mask, state.past)
        return logits, State(mask, present)

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> np.ndarray:
        """`steps` greedy tokens per row, [B, steps], after a left-padded prompt."""
        logits, state = self.prefill(input_ids, attention_mask, reserve=steps - 1)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            logits, state = self.extend(tokens[-1][:, None], state)
            tokens.append(logits[:, -1].argmax(-1))
        return np.stack(tokens, axis=1)
