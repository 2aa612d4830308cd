"""The PyTorch reference and the ONNX export, with each cache contract, reproduce the
official ParScale outputs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CONFORMANCE, CONFORMANCE_NAMES, official

from parscale_export.contract import CACHE_NAMES, ORT_TYPES
from parscale_export.errors import UsageError
from parscale_export.reference import Reference
from parscale_export.runtime import Runtime
from parscale_export.stepping import Stepper

TOL = 1e-4  # float32; observed ~2e-6


def engine(kind: str, name: str, bundle) -> Stepper:
    if kind == "reference":
        return Reference.from_checkpoint(CONFORMANCE / name)
    return Runtime(bundle(CONFORMANCE / name, cache=KIND_CACHES[kind]))


KIND_CACHES = {"onnx": "dynamic", "onnx-static": "static", "onnx-gqa": "gqa"}


@pytest.fixture(params=["reference", *KIND_CACHES])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=list(CACHE_NAMES))
def cache(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_prefill_and_greedy_decode_match_official(kind: str, name: str, bundle) -> None:
    ref = official(name)
    stepper = engine(kind, name, bundle)
    real = ref["attention_mask"].astype(bool)
    logits, state = stepper.prefill(ref["input_ids"], ref["attention_mask"])
    assert np.abs(logits - ref["prefill_logits"])[real].max() < TOL
    np.testing.assert_array_equal(logits[:, -1].argmax(-1), ref["step_tokens"][:, 0])
    steps = ref["step_tokens"].shape[1]
    for s in range(steps):
        logits, state = stepper.extend(ref["step_tokens"][:, s : s + 1], state)
        assert np.abs(logits[:, 0] - ref["step_logits"][:, s]).max() < TOL, f"step {s}"
        if s + 1 < steps:
            np.testing.assert_array_equal(logits[:, 0].argmax(-1), ref["step_tokens"][:, s + 1])
    assert state.past_length == ref["input_ids"].shape[1] + steps


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_chunked_prefill_matches_official(kind: str, name: str, bundle) -> None:
    """Sequence > 1 with past > 0: the prompt in two chunks gives the one-shot logits (contract
    v3 takes such chunks one sequence at a time and refuses a batch of them, clearly)."""
    ref = official(name)
    stepper = engine(kind, name, bundle)
    split = 5
    ids, mask = ref["input_ids"], ref["attention_mask"]
    assert (mask[:, split:] == 1).all(), "the second chunk must hold real tokens only"
    rows = [slice(None)] if stepper.batched_chunks else [slice(b, b + 1) for b in range(len(ids))]
    if not stepper.batched_chunks:
        _, state = stepper.prefill(ids[:, :split], mask[:, :split])
        with pytest.raises(UsageError, match="one sequence at a time"):
            stepper.extend(ids[:, split:], state)
    parts = []
    for row in rows:
        first, state = stepper.prefill(ids[row, :split], mask[row, :split])
        second, state = stepper.extend(ids[row, split:], state)
        parts.append(np.concatenate([first, second], axis=1))
        assert state.past_length == mask.shape[1]
    both = np.concatenate(parts, axis=0)
    assert np.abs(both - ref["prefill_logits"])[mask.astype(bool)].max() < TOL


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_unpadded_single_sequence_matches_padded_batch(kind: str, name: str, bundle) -> None:
    """Batch 1, no padding: the most padded row alone gives the official logits of its real tokens."""
    ref = official(name)
    stepper = engine(kind, name, bundle)
    row = 2
    real = ref["attention_mask"][row].astype(bool)
    ids = ref["input_ids"][row, real][None]
    logits, state = stepper.prefill(ids, np.ones_like(ids))
    assert np.abs(logits[0] - ref["prefill_logits"][row, real]).max() < TOL
    for s in range(ref["step_tokens"].shape[1]):
        logits, state = stepper.extend(ref["step_tokens"][row : row + 1, s : s + 1], state)
        assert np.abs(logits[0, 0] - ref["step_logits"][row, s]).max() < TOL


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_onnx_outputs_follow_contract_v1(name: str, bundle) -> None:
    """(The in-place contracts' outputs are their inputs' buffers: tests/test_static_cache.py.)"""
    ref = official(name)
    runtime = Runtime(bundle(CONFORMANCE / name, cache="dynamic"))
    contract = runtime.contract
    ids, mask = ref["input_ids"], ref["attention_mask"].astype(np.int64)
    batch, seq = ids.shape
    logits, present = runtime.run(ids, mask, contract.empty_past(batch))
    outputs = dict(zip(contract.output_names(), [logits, *present], strict=True))
    assert contract.check_outputs(outputs, batch=batch, seq=seq, past=0) == []
    step_ids = ref["step_tokens"][:, :1]
    mask2 = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    logits, present2 = runtime.run(step_ids, mask2, present)
    outputs = dict(zip(contract.output_names(), [logits, *present2], strict=True))
    assert contract.check_outputs(outputs, batch=batch, seq=1, past=seq) == []
    # The present extends the past: its first `seq` positions are the past, unchanged.
    for old, new in zip(present, present2, strict=True):
        np.testing.assert_array_equal(new[:, :, :seq], old)


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_graph_inputs_and_outputs_are_declared_as_the_contract_says(name: str, cache: str, bundle) -> None:
    runtime = Runtime(bundle(CONFORMANCE / name, cache=cache))
    assert runtime.contract.version == CACHE_NAMES[cache]
    declared = runtime.session.get_inputs(), runtime.session.get_outputs()
    specs = runtime.contract.input_spec(), runtime.contract.output_spec()
    for values, spec in zip(declared, specs, strict=True):
        assert [v.name for v in values] == list(spec)
        for value in values:
            dtype, shape = spec[value.name]
            assert ORT_TYPES[value.type] == dtype, value.name
            assert len(value.shape) == len(shape), value.name
            for got, want in zip(value.shape, shape, strict=True):
                # static axes carry their size; dynamic ones a symbolic name
                assert got == want if isinstance(want, int) else isinstance(got, str), (value.name, value.shape)
