"""Continuous batching over a Stepper: requests join the running batch at step boundaries and
leave it as they finish, so a server never runs one request while others wait.

`Scheduler` is what every layout shares: the bounded queue, the stepping thread's loop, and one
error boundary per step. How a step uses the cache is the contract's business, chosen in one
place (rows.batcher_for):
- `Batcher` (contract v1, a cache that grows by concatenation) merges every running sequence's
  cache into one left-padded batch on the host, below;
- rows.RowBatcher (contracts v2 and v3, fixed in-place buffers) gives each request a row of
  one buffer, and moves nothing when another joins or leaves.

Batcher's step:
  1. decode one token for every running sequence (one call over the whole batch);
  2. prefill the requests admitted at this boundary (one call, left-padded among themselves);
  3. rebuild the batch: finished rows leave, new rows join. Caches and masks are left-padded
     to a common length; padded slots carry mask 0, so they add exactly nothing, and positions
     come from the mask's cumsum (stepping.positions), so padding moves no token.
Every sequence's mask is zeros then ones (left padding, then real tokens), so the batch is cut
back to its longest sequence whenever rows leave. How cache rows map to sequences is the
contract's business (Contract.take_sequences / join_sequences), not this module's.

Each request has its own sampling settings and random generator (generate.choose), so its
tokens are those of the same request run alone through generate.generate.

No torch and no ray: numpy and a Stepper. `run` is meant for a thread of its own; `submit` and
`Ticket.cancel` may be called from any thread, and the callbacks run in the stepping thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .contract import Contract
from .generate import Sampling, choose, left_pad
from .stepping import State, Stepper

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFull(RuntimeError):
    """More requests waiting than the batcher was told to hold."""


@dataclass(frozen=True)
class Request:
    """One prompt to continue. `on_token(token)` is called as each token is chosen; `on_finish
    (reason, detail)` once at the end, reason "stop" (an EOS, kept in the output), "length"
    (max_tokens reached), "cancelled" or "error" (detail says what failed)."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    ignore_eos: bool = False
    on_token: Callable[[int], None] = lambda _token: None
    on_finish: Callable[[str, str], None] = lambda _reason, _detail: None


class Ticket:
    """A submitted request as the batcher tracks it; `cancel()` frees its row at the next step."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._rng = np.random.default_rng(request.sampling.seed)
        self._cancelled = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    def _choose(self, last_logits: np.ndarray) -> int:
        """The next token from this sequence's logits [V], with its own settings and generator."""
        return int(choose(last_logits[None], self.request.sampling, self._rng)[0])

    def _push(self, token: int, eos_ids: frozenset[int]) -> None:
        if self._cancelled:
            self._finish(CANCELLED)
            return
        self.tokens.append(token)
        try:
            self.request.on_token(token)
        except Exception:  # a listener that went away: stop spending a row on it
            self._finish(CANCELLED)
            return
        if token in eos_ids and not self.request.ignore_eos:
            self._finish(STOP)
        elif len(self.tokens) >= self.request.max_tokens:
            self._finish(LENGTH)

    def _finish(self, reason: str, detail: str = "") -> None:
        if self.done:
            return
        self.finish_reason = reason
        with contextlib.suppress(Exception):  # the listener's own failure must not stop the batch
            self.request.on_finish(reason, detail)


class Scheduler:
    """The queue and the stepping loop every layout shares. At most `max_batch` sequences run at
    once; at most `max_queue` wait for a row, more is refused (QueueFull) rather than queued
    without bound. A layout supplies `_advance` (one step's calls), `_in_flight` (the tickets it
    holds) and `_reset` (forget them all after the engine failed)."""

    def __init__(
        self,
        engine: Stepper,
        contract: Contract,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        max_batch: int = 16,
        max_queue: int = 64,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.contract = engine, contract
        self.eos_ids, self.pad_id = frozenset(eos_ids), pad_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[Ticket] = deque()
        self._wake = threading.Condition()
        self._closed = False

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences, for health reports."""
        return len(self._in_flight()), len(self._waiting)

    def submit(self, requests: Sequence[Request]) -> list[Ticket]:
        """Queue `requests`, all or none; QueueFull when they would not fit in the queue."""
        tickets = [Ticket(r) for r in requests]
        for request in requests:
            if not request.prompt or request.max_tokens < 0:
                raise ValueError("a request needs a non-empty prompt and max_tokens >= 0")
            self._check_fits(request)
        with self._wake:
            if self._closed:
                raise QueueFull("the batcher is shut down")
            live = [t for t in tickets if t.request.max_tokens > 0]
            if len(self._waiting) + len(live) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already wait (the bound is {self.max_queue})")
            self._waiting.extend(live)
            self._wake.notify()
        for ticket in tickets:
            if ticket.request.max_tokens == 0:
                ticket._finish(LENGTH)
        return tickets

    def run(self) -> None:
        """Step until close(), sleeping while there is nothing to do; then cancel what is left."""
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._in_flight():
                    self._wake.wait()
                if self._closed:
                    break
            self.step()
        for ticket in [*self._in_flight(), *self._waiting]:
            ticket._finish(CANCELLED)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def step(self) -> bool:
        """One step boundary and one token for every running sequence; False when idle."""
        with self._wake:
            for ticket in [t for t in self._waiting if t.cancelled]:
                self._waiting.remove(ticket)
                ticket._finish(CANCELLED)
            if not self._waiting and not self._in_flight():
                return False
        try:
            self._advance()
        except Exception as exc:  # the engine failed: fail this batch, keep serving the next
            for ticket in self._in_flight():
                ticket._finish(ERROR, f"{type(exc).__name__}: {exc}")
            self._reset()
        return True

    def _take(self, limit: int, fits: Callable[[list[Ticket]], bool] = lambda _group: True) -> list[Ticket]:
        """Up to `limit` waiting tickets, oldest first, while `fits` accepts the group they would
        make (the oldest is taken whenever `limit` allows)."""
        taken: list[Ticket] = []
        with self._wake:
            while self._waiting and len(taken) < limit and (not taken or fits([*taken, self._waiting[0]])):
                taken.append(self._waiting.popleft())
        return taken

    def _emit(self, tickets: Sequence[Ticket], last_logits: np.ndarray) -> None:
        for row, ticket in enumerate(tickets):
            ticket._push(ticket._choose(last_logits[row]), self.eos_ids)

    def _check_fits(self, request: Request) -> None:
        """Raise ValueError for a request this layout's cache cannot hold (checked at submit,
        so it never fails a running batch)."""

    def _advance(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> list[Ticket]:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError


class Batcher(Scheduler):
    """Contract v1: every admitted request runs in one left-padded batch whose cache is merged
    on the host when requests join and cut back when they leave."""

    def __init__(self, engine: Stepper, contract: Contract, *args, **kwargs) -> None:
        if contract.cache.in_place:
            raise ValueError(f"contract v{contract.version} keeps its cache in place: serve it with rows.RowBatcher")
        super().__init__(engine, contract, *args, **kwargs)
        self._running: list[Ticket] = []  # touched by the stepping thread only
        self._joining: list[Ticket] = []  # admitted at this boundary, not yet in the batch
        self._state: State | None = None  # the running rows' mask and cache, in _running's order

    def _in_flight(self) -> list[Ticket]:
        return [*self._running, *self._joining]

    def _reset(self) -> None:
        self._running, self._joining, self._state = [], [], None

    def _advance(self) -> None:
        self._joining = self._take(self.max_batch - len(self._running))
        if self._running:
            self._decode()
        joining = self._prefill(self._joining) if self._joining else None
        self._rebuild(self._joining, joining)
        self._joining = []

    def _decode(self) -> None:
        tokens = np.array([[t.tokens[-1]] for t in self._running], dtype=np.int64)  # [B, 1]
        logits, self._state = self.engine.extend(tokens, self._state)
        self._emit(self._running, logits[:, -1])

    def _prefill(self, admitted: list[Ticket]) -> State:
        ids, mask = left_pad([t.request.prompt for t in admitted], self.pad_id)
        logits, state = self.engine.prefill(ids, mask)
        self._emit(admitted, logits[:, -1])
        return state

    def _rebuild(self, admitted: list[Ticket], joining: State | None) -> None:
        """Drop finished rows, add the admitted ones that go on, cut the batch to its longest
        sequence. Touches the cache only when rows leave or join."""
        parts = [(self._running, self._state), (admitted, joining)]
        kept = [(tickets, state, [i for i, t in enumerate(tickets) if not t.done]) for tickets, state in parts]
        kept = [(tickets, state, rows) for tickets, state, rows in kept if state is not None]
        if not admitted and all(len(rows) == len(tickets) for tickets, _, rows in kept):
            return  # nobody left, nobody joined: the batch stays as it is
        kept = [(tickets, state, rows) for tickets, state, rows in kept if rows]
        if not kept:
            self._running, self._state = [], None
            return
        length = max(int(state.attention_mask[rows].sum(1).max()) for _, state, rows in kept)
        masks, pasts = [], []
        for _, state, rows in kept:
            own = min(length, state.past_length)  # every row's real tokens are its last columns
            masks.append(_pad_left(state.attention_mask[rows, -own:], length))
            pasts.append(self.contract.take_sequences(_on_host(state.past), rows, own))
        self._running = [tickets[i] for tickets, _, rows in kept for i in rows]
        self._state = State(np.concatenate(masks), self.contract.join_sequences(pasts, length))


def _pad_left(mask: np.ndarray, length: int) -> np.ndarray:
    return np.pad(mask, ((0, 0), (length - mask.shape[1], 0)))


def _on_host(past: list) -> list[np.ndarray]:
    """The cache as numpy arrays: a device cache (OrtValues on CUDA) is copied to the host only
    when rows leave or join; the runtime binds host arrays as inputs on the next call."""
    return [t if isinstance(t, np.ndarray) else t.numpy() for t in past]
