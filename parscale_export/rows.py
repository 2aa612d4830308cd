"""Continuous batching over an in-place cache (contracts v2 and v3): each request owns a row of
one buffer, and nothing moves when another request joins or leaves.

A replica allocates its cache once: one buffer per cache tensor, [max_batch, P*KV, capacity, D]
(Runtime.empty_past(max_batch): zeros, on the device under CUDA). Rows [0, n) hold the n
decoding sequences. A decode step is one call over just those rows (Runtime.run_rows binds them
by address, so no other row is read, written or copied; mid-size P=4, one thread, 4 rows of 640
tokens in use: 46 ms over those rows, 74 ms over all 16), with the mask [n, longest + 1]: each
row's ones, its new 1 right after them, then zeros. v2 and v3 graphs read such right-padded rows
exactly (model.PackedSlots): a row's new keys go right after its own last token, its positions
come from its own mask.

A request's life:
  - admitted oldest first, into the rows right after the decoding ones, once this step's decode
    is done. Requests that wait together are prefilled together: one call over their rows,
    whole prompts padded on the right (no more padding than prompt), the first call of each
    row, which writes the learned prefix there (v3: a call whose mask is as long as its input);
  - while rows decode, a step prefills at most `prefill_chunk` prompt tokens (padding counted)
    for each request that could start per running one (rounded up), so a join stalls the
    running rows by one chunk a step when few wait, not by a whole prompt: a prompt longer than
    what is left goes alone over its own row, batch 1, in chunks over several steps (v3 takes
    several new tokens over a past one sequence at a time), and the requests behind it wait
    their turn. With no row decoding there is nobody to stall, and the step prefills
    everything that gets a row, as offline generate's first call would;
  - joins the decoding rows when its whole prompt is in. If decoding rows left while its prompt
    went in by chunks, its cache moves down to row n: one sequence's cache, the only copy a
    join makes;
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

# Prompt tokens fed per step while others decode (0: whole prompts, no limit). Mid-size P=4, one
# CPU thread, batch 1: a 512-token prompt costs 4.4-4.7 ms a token in chunks of 64 to 512; a
# 2,048-token one 7.7 in chunks of 128 or 256, 8.2 in 512, 8.7 whole. 256 loses nothing and
# stalls running rows about 1.2 s a step there (scripts/bench_serve.py --stall).
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
        budget = self._budget()
        while budget > 0:
            if self._filling is None:
                group = self._admit(budget)
                if self._filling is None:
                    if not group:
                        break
                    budget -= self._prefill(group)
                    continue
            budget -= self._fill(budget)

    def _budget(self) -> float:
        """Prompt tokens this step may prefill: `prefill_chunk` for each request that could start
        (waiting, with a free row) per running one, rounded up. One chunk when few wait for many
        running rows (a long prompt joining stalls them one chunk a step); more when many wait for
        few, so that a burst of arrivals is not fed one chunk a step behind the first of them.
        No limit with nobody running to stall, or `prefill_chunk` 0."""
        running = len(self._rows) + (self._filling is not None)
        if not running or not self.prefill_chunk:
            return math.inf
        with self._wake:
            could_start = min(len(self._waiting), self.max_batch - running)
        return self.prefill_chunk * max(1, math.ceil(could_start / running))

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

    def _admit(self, budget: float) -> list[Ticket]:
        """The oldest waiting requests that fit the free rows and, padded to the longest of them,
        `budget` tokens (no more padding than prompt); or the oldest alone, to prefill in chunks
        (`_filling`) when its prompt is longer than `budget`: then none. Empty when nothing can
        start (or what started was cancelled while it waited)."""
        group = self._take(self.max_batch - len(self._rows), lambda g: _padded(g) <= min(budget, 2 * _tokens(g)))
        for ticket in [t for t in group if t.cancelled]:
            group.remove(ticket)
            ticket._finish(CANCELLED)
        if len(group) == 1 and len(group[0].request.prompt) > budget:
            self._filling, self._fill_row, self._fed = group[0], len(self._rows), 0
            return []
        return group

    def _prefill(self, group: list[Ticket]) -> int:
        """Whole prompts, one call over the rows after the decoding ones, padded on the right
        (each row's logits are read at its last token); the rows then decode. Padded tokens spent."""
        lengths = [len(t.request.prompt) for t in group]
        ids = np.full((len(group), max(lengths)), self.pad_id, dtype=np.int64)  # [k, longest]
        mask = np.zeros_like(ids)
        for row, ticket in enumerate(group):
            ids[row, : lengths[row]], mask[row, : lengths[row]] = ticket.request.prompt, 1
        first = len(self._rows)
        self._rows += group  # in flight from here: should the call fail, they fail with the others
        self._lengths += lengths
        logits = self.engine.run_rows(ids, mask, self.buffers, first)
        self._emit(group, logits[np.arange(len(group)), np.array(lengths) - 1])
        for row in reversed(range(first, len(self._rows))):
            if self._rows[row].done:
                self._leave(row)
        return ids.size

    def _fill(self, budget: float) -> int:
        """Feed the prefilling request up to `budget` more prompt tokens; how many it took."""
        ticket = self._filling
        assert ticket is not None
        if ticket.cancelled:
            ticket._finish(CANCELLED)
            self._filling = None
            return 0
        prompt = ticket.request.prompt
        n = int(min(budget, self.prefill_chunk or math.inf, len(prompt) - self._fed))  # one chunk a call
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


def _tokens(group: list[Ticket]) -> int:
    return sum(len(t.request.prompt) for t in group)


def _padded(group: list[Ticket]) -> int:
    return len(group) * max(len(t.request.prompt) for t in group)
