"""Our rotary frequencies equal transformers' for every scaling type we accept."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from parscale_export.config import parse_config
from parscale_export.rope import rope_frequencies
from parscale_export.synthetic import parscale_config

CASES = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "yarn-original-max": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn-tuned": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.7},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "legacy-type-key": {"type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("scaling", CASES.values(), ids=CASES.keys())
def test_matches_transformers(scaling: dict) -> None:
    raw = parscale_config(hidden_size=128, num_attention_heads=4, rope_theta=50000.0, rope_scaling=dict(scaling))
    ours, our_scale = rope_frequencies(parse_config(raw))
    hf = Qwen2Config(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=raw["max_position_embeddings"],
        rope_theta=50000.0,
        rope_scaling=dict(scaling),
    )
    rope_type = scaling.get("rope_type", scaling.get("type"))
    theirs, their_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(their_scale, rel=1e-9)


def test_default_is_the_textbook_formula() -> None:
    inv_freq, scale = rope_frequencies(parse_config(parscale_config(hidden_size=64, num_attention_heads=4)))
    expected = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).double() / 16)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert scale == 1.0


def test_scaling_changes_the_frequencies() -> None:
    """Guard against a test that cannot fail: the scaled cases really differ from default."""
    default, _ = rope_frequencies(parse_config(parscale_config()))
    linear, _ = rope_frequencies(parse_config(parscale_config(rope_scaling={"rope_type": "linear", "factor": 2.0})))
    torch.testing.assert_close(linear, default / 2)
