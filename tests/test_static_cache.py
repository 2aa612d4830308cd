"""Contract v2: fixed buffers written in place. Who writes which slot, that past and present are
one buffer, sizing, decoding up to capacity and the clear error past it, and equality with v1
(the last three for contract v3 too, whose own slots are tested in test_gqa_cache.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import CONFORMANCE, STATIC_MAX_LENGTH, TINY
from parscale_export.cli.main import main

from parscale_export.checkpoint import load_weights
from parscale_export.config import load_config
from parscale_export.errors import BundleError, CapacityError
from parscale_export.export import ExportOptions, contract_for
from parscale_export.genai import genai_config
from parscale_export.generate import generate
from parscale_export.runtime import Runtime

PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [7, 200], [33, 34, 35, 36]]


@pytest.fixture(scope="module", params=["static", "gqa"])
def in_place(request, bundle) -> Runtime:
    """A bundle of each in-place contract (v2, v3): they share these behaviours."""
    return Runtime(bundle(TINY, cache=request.param))


@pytest.fixture(scope="module")
def dynamic(bundle) -> Runtime:
    return Runtime(bundle(TINY, cache="dynamic"))


@pytest.mark.parametrize("cache", ["static", "gqa"])
@pytest.mark.parametrize("checkpoint", [TINY, CONFORMANCE / "p2_gqa_bf16_sharded"], ids=lambda p: p.name)
def test_slots_hold_the_tokens_and_the_prefix(checkpoint, cache: str, bundle) -> None:
    """After a first call over `total` tokens the tokens' slots equal contract v1's cache (the same
    rows b*P+p seen as heads p*KV..) and the prefix slots the checkpoint's prefix: tokens in
    [0, total) then the prefix (v2), or the prefix in [0, T) then the tokens (v3). Slots after
    both are untouched."""
    v1, fixed = Runtime(bundle(checkpoint, cache="dynamic")), Runtime(bundle(checkpoint, cache=cache))
    config = load_config(checkpoint)
    n, kv, d, t = config.parscale_n, config.num_kv_heads, config.head_dim, config.parscale_n_tokens
    weights = load_weights(checkpoint, config)
    ids = np.array([[5, 17, 42, 8, 99], [7, 3, 150, 21, 64]])
    mask = np.ones_like(ids)
    _, old = v1.prefill(ids, mask)
    _, new = fixed.prefill(ids, mask, reserve=3)
    tokens_at, prefix_at = (0, 5) if cache == "static" else (t, 0)
    for layer in range(config.num_layers):
        for which, kind in enumerate(("key", "value")):
            buffer = new.past[2 * layer + which].numpy()  # [B, P*KV, capacity, D]
            assert buffer.shape == (2, n * kv, t + 5 + 3, d)
            rows = old.past[2 * layer + which]  # [B*P, KV, 5, D]
            tokens = buffer[:, :, tokens_at : tokens_at + 5]
            np.testing.assert_allclose(tokens, rows.reshape(2, n * kv, 5, d), atol=1e-5)
            prefix = weights[f"model.layers.{layer}.self_attn.prefix_{kind[0]}"].reshape(n * kv, t, d).numpy()
            stored = buffer[:, :, prefix_at : prefix_at + t]
            np.testing.assert_array_equal(stored, np.broadcast_to(prefix, (2, n * kv, t, d)))
            assert not buffer[:, :, 5 + t :].any(), "slots past the tokens and the prefix are never written"


def test_past_and_present_are_one_buffer(in_place: Runtime) -> None:
    """A decode step writes its token's slot in place and leaves the earlier slots alone: the
    tokens (v2), and the prefix before them (v3: tokens start after its T slots)."""
    _, state = in_place.prefill(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64), reserve=4)
    tokens_at = in_place.contract.prefix_slots if in_place.contract.version == 3 else 0
    pointers = [value.data_ptr() for value in state.past]
    before = state.past[0].numpy().copy()  # on CPU, numpy() may be a view of the buffer
    _, after = in_place.extend(np.array([[9]]), state)
    assert [value.data_ptr() for value in after.past] == pointers
    now, new = after.past[0].numpy(), tokens_at + 3
    np.testing.assert_array_equal(now[:, :, :new], before[:, :, :new])
    assert not np.array_equal(now[:, :, new], before[:, :, new]), "the new token's slot was written in place"


def test_left_padded_batch_equals_one_by_one_and_contract_v1(in_place: Runtime, dynamic: Runtime) -> None:
    batched = generate(in_place, PROMPTS, max_new_tokens=10)
    assert batched == [generate(in_place, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == generate(dynamic, PROMPTS, max_new_tokens=10)


def test_a_buffer_sized_to_the_request_equals_the_full_one(in_place: Runtime) -> None:
    ids, mask = np.array([[4, 8, 15, 16, 23, 42]]), np.ones((1, 6), np.int64)
    small, _ = in_place.prefill(ids, mask, reserve=0)
    full, state = in_place.prefill(ids, mask)
    assert state.past[0].shape()[2] == 8 + STATIC_MAX_LENGTH  # T prefix slots + max_length tokens
    np.testing.assert_allclose(small, full, atol=1e-5)


def test_decodes_to_capacity_then_refuses(in_place: Runtime, dynamic: Runtime) -> None:
    ids = np.array([[3, 1, 4, 1, 5]])
    mask = np.ones_like(ids)
    logits, state = in_place.prefill(ids, mask)  # room for max_length tokens
    want, ref = dynamic.prefill(ids, mask)
    while state.past_length < STATIC_MAX_LENGTH:
        token = want[:, -1].argmax(-1)[:, None]
        logits, state = in_place.extend(token, state)
        want, ref = dynamic.extend(token, ref)
        np.testing.assert_allclose(logits, want, atol=1e-4)
    assert state.past_length == STATIC_MAX_LENGTH
    with pytest.raises(CapacityError, match="the cache is full"):
        in_place.extend(np.array([[7]]), state)
    with pytest.raises(CapacityError, match="max_length 40"):
        in_place.prefill(ids, mask, reserve=STATIC_MAX_LENGTH)


def test_cli_generate_past_capacity_exits_2(bundle, capsys) -> None:
    path = str(bundle(TINY, cache="static"))
    fits = STATIC_MAX_LENGTH - 3 + 1  # the last new token is never fed back
    assert main(["generate", path, "--input-ids", "1 2 3", "-n", str(fits), "--json", "--provider", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == fits
    assert main(["generate", path, "--input-ids", "1 2 3", "-n", str(fits + 1), "--provider", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "do not fit this bundle's cache" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--opset", "18", "--cache", "gqa"], "--cache gqa needs opset 23; drop --opset, or add --cache dynamic"),
        (["--opset", "18", "--cache", "static"], "--cache static needs opset 24; drop --opset"),
        (["--max-length", "64", "--cache", "dynamic"], "--max-length goes with --cache static or gqa"),
        (["--max-length", "64", "--opset", "18"], "--max-length goes with --cache static or gqa"),
    ],
)
def test_convert_refuses_inconsistent_cache_options(args, message, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(TINY), "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_manifest_of_contract_v2_needs_max_length(bundle, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle(TINY, cache="static"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["contract"]["version"] == 2 and manifest["opset"] == 24
    manifest["contract"]["max_length"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="positive max_length"):
        Runtime(copy)


def test_genai_config_of_contract_v2_warns_that_the_whole_buffer_is_read() -> None:
    """genai allocates the declared T + max_length slots and v2's Attention reads all of them."""
    config = load_config(TINY)
    contract = contract_for(config, ExportOptions(genai=True, cache="static", max_length=32))
    settings, notes = genai_config(config, contract, {"eos_token_id": [1], "pad_token_id": [], "bos_token_id": []})
    assert settings["search"]["max_length"] == 32 and settings["search"]["past_present_share_buffer"]
    assert any(f"{32 + config.parscale_n_tokens} slots" in note for note in notes)
    assert any("reads the whole buffer" in note for note in notes)
