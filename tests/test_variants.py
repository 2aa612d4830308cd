"""Checkpoint shapes the conformance set does not cover: the ONNX export equals the reference
(itself proven equal to the official model) on a left-padded batch, prefill and greedy decode."""

from __future__ import annotations

import numpy as np
import pytest

from parscale_export.reference import Reference
from parscale_export.runtime import Runtime
from parscale_export.synthetic import parscale_config, write_checkpoint

VARIANTS = {
    "p3-odd-gqa-linear-rope": (
        parscale_config(parscale_n=3, parscale_n_tokens=5, rope_scaling={"type": "linear", "factor": 2.0}),
        1,
    ),
    "p8-t48-mqa-tied-bf16-sharded": (
        parscale_config(
            parscale_n=8, parscale_n_tokens=48, num_key_value_heads=1, tie_word_embeddings=True, torch_dtype="bfloat16"
        ),
        3,
    ),
    "qwen2-explicit-head-dim": (
        parscale_config(model_type="qwen2", head_dim=32, parscale_n=1, architectures=["Qwen2ForCausalLM"]),
        1,
    ),
    "p2-yarn": (
        parscale_config(parscale_n=2, parscale_n_tokens=3, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        1,
    ),
    "p5-mha-llama3-rope": (
        parscale_config(
            parscale_n=5,
            num_key_value_heads=4,
            parscale_attn_smooth=0.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        1,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("variants")
    return {
        name: write_checkpoint(root / name, raw, seed=i, shards=shards)
        for i, (name, (raw, shards)) in enumerate(VARIANTS.items())
    }


def left_padded_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 9))
    mask = np.ones((3, 9), np.int64)
    for b in range(3):
        mask[b, : 2 * b] = 0
        ids[b, : 2 * b] = 0
    return ids, mask


# Contracts v2 and v3 on the shapes that stress their prefix slots: odd P, P = 1 (no prefix), T = 48
# with MQA.
PREFIX_SHAPES = ("p3-odd-gqa-linear-rope", "qwen2-explicit-head-dim", "p8-t48-mqa-tied-bf16-sharded")
STATIC = [(name, cache) for cache in ("static", "gqa") for name in PREFIX_SHAPES]


@pytest.mark.parametrize(("name", "cache"), [(name, "dynamic") for name in VARIANTS] + STATIC)
def test_onnx_equals_reference(name: str, cache: str, checkpoints: dict, bundle) -> None:
    reference = Reference.from_checkpoint(checkpoints[name])
    runtime = Runtime(bundle(checkpoints[name], cache=cache))
    ids, mask = left_padded_batch(VARIANTS[name][0]["vocab_size"])
    want, ref_state = reference.prefill(ids, mask)
    got, ort_state = runtime.prefill(ids, mask)
    assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4
    token = want[:, -1].argmax(-1)
    np.testing.assert_array_equal(got[:, -1].argmax(-1), token)
    for _ in range(6):
        want, ref_state = reference.extend(token[:, None], ref_state)
        got, ort_state = runtime.extend(token[:, None], ort_state)
        assert np.abs(got - want).max() < 1e-4
        token = want[:, -1].argmax(-1)
        np.testing.assert_array_equal(got[:, -1].argmax(-1), token)
