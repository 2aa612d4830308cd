"""Continuous batching without Ray: requests that join while others decode and leave early get
exactly the tokens offline `generate` gives each of them alone, for P=1 and P>1, for contract v1
(one merged batch, both cache layouts) and the in-place contracts v2 and v3 (a row per request,
prefilled in chunks or whole); the batch really is shared; the queue bound holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import CONFORMANCE, TINY

from parscale_export.batching import Batcher, QueueFull, Request
from parscale_export.contract import Contract
from parscale_export.export import ExportOptions, convert
from parscale_export.generate import Sampling, generate
from parscale_export.rows import RowBatcher, batcher_for
from parscale_export.runtime import Runtime
from parscale_export.stepping import Stepper

SAMPLED = Sampling(temperature=0.9, top_p=0.9, seed=11)
# (prompt, max_tokens, sampling, submitted before step number)
SCRIPT = [
    ([5, 9, 13, 2, 7], 12, Sampling(), 0),
    ([17, 3], 4, Sampling(), 0),
    ([40, 41, 42, 43, 44, 45, 46, 47, 48], 9, SAMPLED, 0),
    ([1], 7, Sampling(), 2),  # joins while the first three decode
    ([20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140], 5, Sampling(), 3),
    ([8, 8, 8], 1, Sampling(), 3),  # leaves right after its prefill
    ([99, 98, 97, 96], 10, Sampling(temperature=1.2, top_k=20, seed=3), 6),  # joins after row 2 left
    ([2, 4, 6, 8, 10, 12], 6, Sampling(), 11),  # joins a batch that has shrunk
]


class Recording(Stepper):
    """A runtime that remembers the shape of every call (and, over rows, the first row it bound
    and every row it copied)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime, self.calls, self.copies = runtime, [], []
        self.rows: list[tuple[int, int, int, int]] = []  # (batch, new tokens, mask columns, first row)

    def run(self, input_ids, attention_mask, past):
        self.calls.append(input_ids.shape)
        return self.runtime.run(input_ids, attention_mask, past)

    def empty_past(self, batch, tokens=None):
        return self.runtime.empty_past(batch, tokens)

    def run_rows(self, input_ids, attention_mask, buffers, first):
        self.calls.append(input_ids.shape)
        self.rows.append((*input_ids.shape, attention_mask.shape[1], first))
        return self.runtime.run_rows(input_ids, attention_mask, buffers, first)

    def copy_row(self, buffers, source, target, slots):
        self.copies.append((source, target, slots))
        self.runtime.copy_row(buffers, source, target, slots)


@pytest.fixture(scope="module")
def genai_tiny(tmp_path_factory) -> Runtime:
    out = tmp_path_factory.mktemp("genai") / "tiny-genai"
    convert(TINY, out, ExportOptions(genai=True, cache="dynamic"))  # continuous batching moves v1 rows
    return Runtime(out)


def runtimes(bundle, genai_tiny) -> dict[str, Runtime]:
    return {
        "p1": Runtime(bundle(CONFORMANCE / "p1_plain_mqa", cache="dynamic")),
        "p4": Runtime(bundle(TINY, cache="dynamic")),
        "p4-heads": genai_tiny,
    }


def run_script(
    runtime: Runtime, eos_ids: list[int], max_batch: int = 4, prefill_chunk: int = 256
) -> tuple[list[list[int]], Recording]:
    engine = Recording(runtime)
    pad_id = runtime.manifest.pad_id
    batcher = batcher_for(engine, runtime.contract, eos_ids, pad_id, max_batch, prefill_chunk=prefill_chunk)
    streamed: list[list[int]] = [[] for _ in SCRIPT]
    finished: list[str] = [""] * len(SCRIPT)
    tickets, step = [], 0
    while len(tickets) < len(SCRIPT) or not all(t.done for t in tickets):
        for i, (prompt, n, sampling, at) in enumerate(SCRIPT):
            if at == step:
                request = Request(
                    prompt,
                    n,
                    sampling,
                    on_token=streamed[i].append,
                    on_finish=lambda reason, _detail, i=i: finished.__setitem__(i, reason),
                )
                tickets += batcher.submit([request])
        batcher.step()
        step += 1
        assert step < 300
    assert [t.tokens for t in tickets] == streamed, "streamed tokens differ from the final ones"
    assert all(finished), "every request is told it finished"
    return streamed, engine


@pytest.mark.parametrize("name", ["p1", "p4", "p4-heads"])
def test_joining_and_leaving_requests_get_the_offline_tokens(name: str, bundle, genai_tiny) -> None:
    runtime = runtimes(bundle, genai_tiny)[name]
    alone = [generate(runtime, [p], n, sampling=s)[0] for p, n, s, _ in SCRIPT]
    # An EOS that one request meets mid-way: it must stop there, the others run on.
    eos = alone[0][5]
    alone_eos = [generate(runtime, [p], n, [eos], sampling=s)[0] for p, n, s, _ in SCRIPT]
    assert alone_eos[0] == alone[0][:6]

    batched, engine = run_script(runtime, [eos])
    assert batched == alone_eos

    decode_batches = [b for b, s in engine.calls if s == 1]
    assert max(decode_batches) == 4, "the batch should fill to max_batch"
    prefill_at = [i for i, (_, s) in enumerate(engine.calls) if s > 1]
    assert any(0 < i < len(engine.calls) - 1 for i in prefill_at[1:]), "requests should join a running batch"


def test_max_batch_one_still_matches(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="dynamic"))
    alone = [generate(runtime, [p], n, sampling=s)[0] for p, n, s, _ in SCRIPT]
    batched, engine = run_script(runtime, [], max_batch=1)
    assert batched == alone
    assert {b for b, _ in engine.calls} == {1}


def test_queue_bound_refuses_instead_of_growing(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="dynamic"))
    batcher = Batcher(runtime, runtime.contract, max_batch=2, max_queue=3)
    batcher.submit([Request([1, 2], 4) for _ in range(3)])
    with pytest.raises(QueueFull):
        batcher.submit([Request([1, 2], 4)])
    batcher.step()  # two are admitted, one still waits
    assert batcher.load == (2, 1)
    batcher.submit([Request([1, 2], 4), Request([3], 2)])
    with pytest.raises(QueueFull):
        batcher.submit([Request([1, 2], 4)])


def test_zero_tokens_and_cancel(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="dynamic"))
    batcher = Batcher(runtime, runtime.contract, max_batch=4)
    reasons: list[str] = []
    zero, long, short = batcher.submit(
        [
            Request([1, 2], 0, on_finish=lambda r, _: reasons.append(f"zero {r}")),
            Request([1, 2], 50, on_finish=lambda r, _: reasons.append(f"long {r}")),
            Request([3, 4, 5], 3, on_finish=lambda r, _: reasons.append(f"short {r}")),
        ]
    )
    assert zero.tokens == [] and reasons == ["zero length"]
    batcher.step()
    long.cancel()
    while batcher.step():
        pass
    assert reasons == ["zero length", "long cancelled", "short length"]
    assert len(short.tokens) == 3 and short.tokens == generate(runtime, [[3, 4, 5]], 3)[0]
    assert batcher.load == (0, 0)


def test_engine_failure_fails_the_batch_and_serving_goes_on(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="dynamic"))

    class Flaky(Recording):
        def run(self, input_ids, attention_mask, past):
            if len(self.calls) == 2:
                self.calls.append(None)
                raise RuntimeError("device lost")
            return super().run(input_ids, attention_mask, past)

    batcher = Batcher(Flaky(runtime), runtime.contract)
    reasons: list[tuple[str, str]] = []
    batcher.submit([Request([1, 2, 3], 5, on_finish=lambda r, d: reasons.append((r, d)))])
    while batcher.step():
        pass
    assert reasons == [("error", "RuntimeError: device lost")]
    (ticket,) = batcher.submit([Request([1, 2, 3], 5)])
    while batcher.step():
        pass
    assert ticket.tokens == generate(runtime, [[1, 2, 3]], 5)[0]


@pytest.mark.parametrize("layout", ["rows", "heads"])
def test_contract_moves_whole_sequences(layout: str) -> None:
    contract = Contract(1, parscale_n=3, num_kv_heads=2, head_dim=4, vocab_size=10, dtype="float32")
    contract = dataclasses.replace(contract, cache_layout=layout)
    batch, length = 4, 5
    rows = np.arange(np.prod(contract.cache_shape(batch, length)), dtype=np.float32).reshape(
        contract.cache_shape(batch, length)
    )
    # The same memory seen per sequence: [B, P*KV, L, D] in both layouts.
    per_sequence = rows.reshape(batch, -1, length, 4)
    taken = contract.take_sequences([rows, rows], [2, 0], 3)
    assert taken[0].shape == contract.cache_shape(2, 3)
    np.testing.assert_array_equal(taken[0].reshape(2, -1, 3, 4), per_sequence[[2, 0], :, -3:])

    joined = contract.join_sequences([taken, contract.take_sequences([rows, rows], [1], 5)], 5)
    assert joined[1].shape == contract.cache_shape(3, 5)
    view = joined[1].reshape(3, -1, 5, 4)
    np.testing.assert_array_equal(view[:2, :, :2], 0)  # left padding is zeros
    np.testing.assert_array_equal(view[:2, :, 2:], per_sequence[[2, 0], :, -3:])
    np.testing.assert_array_equal(view[2], per_sequence[1])


# Contracts v2 and v3: each request owns a row of one buffer (rows.RowBatcher).
IN_PLACE = {"v3-p1": (CONFORMANCE / "p1_plain_mqa", "gqa"), "v3-p4": (TINY, "gqa"), "v2-p4": (TINY, "static")}


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_rows_joining_and_leaving_get_the_offline_tokens(name: str, bundle) -> None:
    checkpoint, cache = IN_PLACE[name]
    runtime = Runtime(bundle(checkpoint, cache=cache))
    alone = [generate(runtime, [p], n, sampling=s)[0] for p, n, s, _ in SCRIPT]
    eos = alone[0][5]
    alone_eos = [generate(runtime, [p], n, [eos], sampling=s)[0] for p, n, s, _ in SCRIPT]

    batched, engine = run_script(runtime, [eos])
    assert batched == alone_eos

    # Whole prompts (the chunk is longer than any): a prefill's mask is as long as its input.
    decodes = [(batch, first) for batch, seq, columns, first in engine.rows if columns > seq]
    assert max(b for b, _ in decodes) == 4, "the rows should fill to max_batch"
    assert {first for _, first in decodes} == {0}, "a decode step binds the decoding rows [0, n)"
    prefills = [(batch, first) for batch, seq, columns, first in engine.rows if columns == seq]
    assert sum(b for b, _ in prefills) == len(SCRIPT)
    assert max(b for b, _ in prefills) > 1, "requests that wait together are prefilled in one call"
    assert engine.copies, "a request that left from a middle row was replaced by the last one"
    # Each copy moves one sequence: its prefix and its tokens, never the whole buffer.
    capacity = runtime.contract.capacity
    assert all(slots <= runtime.contract.prefix_slots + 17 < capacity for _, _, slots in engine.copies)


@pytest.mark.parametrize("name", ["v3-p4", "v2-p4", "v3-p1"])
def test_chunked_prefill_gives_the_unchunked_tokens(name: str, bundle) -> None:
    checkpoint, cache = IN_PLACE[name]
    runtime = Runtime(bundle(checkpoint, cache=cache))
    whole, _ = run_script(runtime, [], prefill_chunk=0)
    assert whole == [generate(runtime, [p], n, sampling=s)[0] for p, n, s, _ in SCRIPT]
    for chunk in (1, 3):
        chunked, engine = run_script(runtime, [], prefill_chunk=chunk)
        assert chunked == whole, f"prefill_chunk {chunk}"
        # While rows decode, a joining prompt goes in calls of `chunk` tokens over its own row (the
        # first step has nobody to stall and prefills whole prompts).
        chunks = [seq for batch, seq, columns, first in engine.rows if first > 0 and batch == 1 and columns > seq]
        assert chunks, "a prompt went in chunks"
        assert max(chunks) <= chunk


def test_a_long_prompt_does_not_stall_the_running_rows(bundle) -> None:
    """While a 30-token prompt prefills 4 tokens a step, the running request gets a token every step."""
    runtime = Runtime(bundle(TINY, cache="gqa"))
    engine = Recording(runtime)
    batcher = RowBatcher(engine, runtime.contract, max_batch=2, prefill_chunk=4)
    (running,) = batcher.submit([Request([3, 1, 4], 12)])
    batcher.step()
    (joining,) = batcher.submit([Request(list(range(30)), 3)])
    made = []
    while not joining.tokens:
        batcher.step()
        made.append(len(running.tokens))
    assert len(made) == 8  # ceil(30 / 4) steps of prefill, each after one decode step
    assert made == list(range(2, 10))
    while batcher.step():
        pass
    assert running.tokens == generate(runtime, [[3, 1, 4]], 12)[0]
    assert joining.tokens == generate(runtime, [list(range(30))], 3)[0]


def test_run_rows_reads_and_writes_its_rows_only(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="gqa"))
    buffers = runtime.empty_past(3)
    before = [b.numpy() for b in buffers]
    ids, mask = np.array([[5, 9, 13]]), np.ones((1, 3), np.int64)
    logits = runtime.run_rows(ids, mask, buffers, 1)
    np.testing.assert_array_equal(logits, runtime.run(ids, mask, runtime.empty_past(1, 3))[0])
    used = runtime.contract.prefix_slots + 3
    for old, new in zip(before, (b.numpy() for b in buffers), strict=True):
        np.testing.assert_array_equal(new[[0, 2]], old[[0, 2]])  # the other rows are untouched
        assert np.abs(new[1, :, :used]).min(axis=-1).max() > 0  # the prefix and the tokens are in
        np.testing.assert_array_equal(new[1, :, used:], 0)

    runtime.copy_row(buffers, 1, 2, used - 1)
    for new in (b.numpy() for b in buffers):
        np.testing.assert_array_equal(new[2, :, : used - 1], new[1, :, : used - 1])
        np.testing.assert_array_equal(new[2, :, used - 1 :], 0)  # only the slots asked for moved
        np.testing.assert_array_equal(new[0], 0)
    with pytest.raises(ValueError, match="outside"):
        runtime.run_rows(np.array([[1]]), np.ones((1, 1), np.int64), buffers, 3)


def test_each_contract_gets_its_batcher(bundle) -> None:
    v1, v3 = Runtime(bundle(TINY, cache="dynamic")), Runtime(bundle(TINY, cache="gqa"))
    assert type(batcher_for(v1, v1.contract)) is Batcher
    assert type(batcher_for(v3, v3.contract, max_batch=2)) is RowBatcher
    with pytest.raises(ValueError, match="RowBatcher"):
        Batcher(v3, v3.contract)
    with pytest.raises(ValueError, match="no fixed buffers"):
        RowBatcher(v1, v1.contract)


def test_rows_queue_cancel_and_failure(bundle) -> None:
    runtime = Runtime(bundle(TINY, cache="gqa"))
    batcher = RowBatcher(runtime, runtime.contract, max_batch=2, max_queue=2, prefill_chunk=2)
    reasons: list[str] = []

    def request(prompt: list[int], n: int, name: str) -> Request:
        return Request(prompt, n, on_finish=lambda r, _: reasons.append(f"{name} {r}"))

    _zero, long = batcher.submit([request([1, 2], 0, "zero"), request([1, 2], 30, "long")])
    assert reasons == ["zero length"]
    batcher.step()  # nobody decoded yet: `long` is prefilled whole
    filling, short = batcher.submit([request([7, 6, 5, 4, 3], 5, "filling"), request([3, 4, 5], 3, "short")])
    with pytest.raises(QueueFull):
        batcher.submit([Request([1], 1)])
    with pytest.raises(ValueError, match="do not fit a row"):  # refused up front, not mid-batch
        batcher.submit([Request([1] * 30, 12)])  # 41 tokens to hold, max_length 40
    batcher.step()  # `long` decodes; `filling` has the second row and 2 of its 5 tokens in
    assert batcher.load == (2, 1) and len(long.tokens) == 2 and not filling.tokens
    filling.cancel()  # cancelled mid-prefill: its row frees before its prompt is in
    long.cancel()
    while batcher.step():
        pass
    assert reasons == ["zero length", "long cancelled", "filling cancelled", "short length"]
    assert short.tokens == generate(runtime, [[3, 4, 5]], 3)[0]
    assert batcher.load == (0, 0)

    class Flaky(Recording):
        def run_rows(self, input_ids, attention_mask, buffers, first):
            if input_ids.shape[0] == 2:  # the second step's prefill of two joining requests
                raise RuntimeError("device lost")
            return super().run_rows(input_ids, attention_mask, buffers, first)

    batcher = RowBatcher(Flaky(runtime), runtime.contract)
    failed: list[tuple[str, str]] = []
    fail = Request([1, 2, 3], 5, on_finish=lambda r, d: failed.append((r, d)))
    batcher.submit([fail])
    batcher.step()
    batcher.submit([fail, fail])
    while batcher.step():
        pass
    assert failed == [("error", "RuntimeError: device lost")] * 3, "the running request and both joining ones"
    (ticket,) = batcher.submit([Request([1, 2, 3], 5)])
    while batcher.step():
        pass
    assert ticket.tokens == generate(runtime, [[1, 2, 3]], 5)[0]
