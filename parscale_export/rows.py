"""Continuous batching over an in-place cache (contracts v2 and v3): each request owns a row of
one buffer, and nothing moves when another request joins or leaves.

A replica allocates its cache once: one buffer per cache tensor, [max_batch, P*KV, capacity, D]
(Runtime.empty_past(max_batch): zeros, on the device under CUDA). Rows [0, n) hold the n
decoding sequences. A decode step is one call over just those rows (Runtime.run_rows binds them
by address, so no other row is read, written or copied), with the mask [n, longest + 1]: each
row's ones, its new 1 right after them, then zeros. v2 and v3 graphs read such right-padded rows
exactly (model.PackedSlots): a row's new keys go right after its own last token, its positions
come from its own mask.

A request's life:
  - admitted (oldest first) when a row is free and no other request is prefilling: it takes
    row n, the first row after the decoding ones;
  - prefilled over its own row alone, batch 1, in calls of at most `prefill_chunk` prompt tokens
    and at most `prefill_chunk` tokens per step in all, between decode steps: a long prompt
    stalls the running rows one chunk per step, not its whole prompt. Its first call writes the
    learned prefix into its row (v3: the call whose mask is as long as its input);
  - joins the decoding rows when its whole prompt is in. If decoding rows left meanwhile, its
    cache moves down to row n: one sequence's cache, the only copy a join makes;
  - leaves when it finishes: the sequence in the last decoding row moves into its row (one
    sequence's cache, nothing when it was the last row), so the decoding rows stay [0, n).
Moving copies a row's used slots only (prefix and tokens), where the buffers live
(Runtime.copy_row). No torch and no ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .batching import CANCELLED, Batcher, Request, Scheduler, Ticket
from .contract import Contract

# Prompt tokens fed per step while others decode (0: whole prompts, no limit). Measured on the
# mid-size P=4 model (README, serving): see scripts/bench_serve.py --prefill-chunk.
DEFAULT_PREFILL_CHUNK = 256


class RowEngine(Protocol):
    """What RowBatcher needs from its engine; runtime.Runtime has it."""

    def empty_past(self, batch: int, tokens: int | None = None) -> list[Any]: ...

    def run_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, buffers: list[Any], first: int) -> Any: ...

    def copy_row(self, buffers: list[Any], source: int, target: int, slots: int) -> None: ...


class RowBatcher(Scheduler):
    """Contracts v2 and v3: each running request owns a row of one buffer (this module's doc)."""

    def __init__(
        self,
        engine: RowEngine,
        contract: Contract,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if not contract.cache.in_place:
            raise ValueError(f"contract v{contract.version} has no fixed buffers: serve it with batching.Batcher")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: no limit), got {prefill_chunk}")
        super().__init__(engine, contract, eos_ids, pad_id, max_batch, max_queue)
        self.prefill_chunk = prefill_chunk
        self.buffers = engine.empty_past(max_batch)  # [max_batch, P*KV, capacity, D] each, allocated once
        self._rows: list[Ticket] = []  # row i decodes _rows[i]; touched by the stepping thread only
        self._lengths: list[int] = []  # tokens in row i's cache (its prompt and the tokens fed back)
        self._filling: Ticket | None = None  # the request being prefilled, in row _fill_row
        self._fill_row = 0
        self._fed = 0  # prompt tokens of _filling already in its row

    def _check_fits(self, request: Request) -> None:
        held = len(request.prompt) + request.max_tokens - 1  # the last token is never fed back
        if held > (self.contract.max_length or 0):
            raise ValueError(
                f"{len(request.prompt)} prompt tokens + max_tokens {request.max_tokens} do not fit a row of "
                f"this bundle's cache (max_length {self.contract.max_length})"
            )

    def _in_flight(self) -> list[Ticket]:
        return [*self._rows, *([self._filling] if self._filling else [])]

    def _reset(self) -> None:
        """Forget every request; the buffers stay (a row's next owner rewrites what it reads)."""
        self._rows, self._lengths, self._filling = [], [], None

    def _advance(self) -> None:
        if self._rows:
            self._decode()
        budget = self.prefill_chunk or math.inf
        while budget > 0 and (self._filling is not None or self._admit()):
            budget -= self._fill(budget)

    def _decode(self) -> None:
        """One token for every decoding row: one call over rows [0, n)."""
        lengths = np.array(self._lengths)
        mask = (np.arange(lengths.max() + 1) <= lengths[:, None]).astype(np.int64)  # [n, longest + 1]
        ids = np.array([[t.tokens[-1]] for t in self._rows], dtype=np.int64)  # [n, 1]
        logits = self.engine.run_rows(ids, mask, self.buffers, 0)
        self._lengths = (lengths + 1).tolist()
        self._emit(self._rows, logits[:, -1])
        for row in reversed(range(len(self._rows))):  # rows above `row` are still running
            if self._rows[row].done:
                self._leave(row)

    def _leave(self, row: int) -> None:
        last = len(self._rows) - 1
        if row != last:
            self._move(last, row, self._lengths[last])
            self._rows[row], self._lengths[row] = self._rows[last], self._lengths[last]
        self._rows.pop()
        self._lengths.pop()

    def _admit(self) -> bool:
        """Start prefilling the oldest waiting request in the first free row, if there is one."""
        if len(self._rows) >= self.max_batch:
            return False
        taken = self._take(1)
        if taken:
            self._filling, self._fill_row, self._fed = taken[0], len(self._rows), 0
        return bool(taken)

    def _fill(self, budget: float) -> int:
        """Feed the prefilling request up to `budget` more prompt tokens; how many it took."""
        ticket = self._filling
        assert ticket is not None
        if ticket.cancelled:
            ticket._finish(CANCELLED)
            self._filling = None
            return 0
        prompt = ticket.request.prompt
        n = int(min(budget, len(prompt) - self._fed))
        ids = np.array([prompt[self._fed : self._fed + n]], dtype=np.int64)  # [1, n]
        mask = np.ones((1, self._fed + n), dtype=np.int64)
        logits = self.engine.run_rows(ids, mask, self.buffers, self._fill_row)
        self._fed += n
        if self._fed == len(prompt):
            self._filling = None
            self._emit([ticket], logits[:, -1])
            if not ticket.done:
                row = len(self._rows)
                if self._fill_row != row:  # decoding rows left while it prefilled
                    self._move(self._fill_row, row, len(prompt))
                self._rows.append(ticket)
                self._lengths.append(len(prompt))
        return n

    def _move(self, source: int, target: int, length: int) -> None:
        """One sequence's cache (prefix and `length` tokens) from row `source` to row `target`."""
        self.engine.copy_row(self.buffers, source, target, self.contract.prefix_slots + length)


def batcher_for(
    engine: Any,
    contract: Contract,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    max_batch: int = 16,
    max_queue: int = 64,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Scheduler:
    """The batcher a contract's cache needs: rows of fixed buffers (v2, v3) or one merged batch
    (v1, which prefills each boundary's requests in one call and ignores `prefill_chunk`)."""
    if contract.cache.in_place:
        return RowBatcher(engine, contract, eos_ids, pad_id, max_batch, max_queue, prefill_chunk)
    return Batcher(engine, contract, eos_ids, pad_id, max_batch, max_queue)
