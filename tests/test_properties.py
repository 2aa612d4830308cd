"""Property-based tests over config fields: valid configs convert and match the reference;
any mangled config gives a ConfigError with a message, never another exception."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parscale_export.cli.main import main

from parscale_export.config import parse_config
from parscale_export.errors import ConfigError
from parscale_export.reference import Reference
from parscale_export.rope import rope_frequencies
from parscale_export.runtime import Runtime
from parscale_export.synthetic import parscale_config, write_checkpoint

FIELDS = [
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "head_dim",
    "tie_word_embeddings", "parscale_n", "parscale_n_tokens", "parscale_attn_smooth", "torch_dtype",
    "hidden_act", "use_sliding_window", "max_position_embeddings", "rope_parameters",
]  # fmt: skip
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

ROPE = st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["linear", "yarn", "llama3", "dynamic", "default", 3])},
    optional={
        k: ANY_JSON
        for k in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                  "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
    },
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), ANY_JSON, min_size=1, max_size=4),
    drop=st.sets(st.sampled_from(FIELDS)),
    rope=st.none() | ROPE,
)
def test_any_mangled_config_is_accepted_or_a_config_error(changes: dict, drop: set, rope: dict | None) -> None:
    raw = parscale_config(rope_scaling=rope) | changes
    for key in drop:
        raw.pop(key, None)
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        assert str(exc)
        return
    assert config.num_heads % config.num_kv_heads == 0 and config.head_dim % 2 == 0
    inv_freq, scale = rope_frequencies(config)
    assert inv_freq.shape == (config.head_dim // 2,) and np.isfinite(scale)


VALID = st.fixed_dictionaries(
    {
        "parscale_n": st.integers(1, 5),
        "parscale_n_tokens": st.integers(1, 6),
        "heads": st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3), (2, 1)]),
        "head_dim": st.sampled_from([8, 16]),
        "tie_word_embeddings": st.booleans(),
        "torch_dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
        "rope_scaling": st.sampled_from([None, {"rope_type": "linear", "factor": 3.0}]),
        "parscale_attn_smooth": st.sampled_from([0.0, 0.01, 0.2]),
        "model_type": st.sampled_from(["qwen2_parscale", "qwen2"]),
    }
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=VALID, seed=st.integers(0, 1000))
def test_valid_configs_convert_and_match_the_reference(choice: dict, seed: int, tmp_path_factory) -> None:
    heads, kv = choice.pop("heads")
    head_dim = choice.pop("head_dim")
    raw = parscale_config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, vocab_size=64,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, **choice,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("prop")
    ckpt = write_checkpoint(root / "ckpt", raw, seed=seed)
    assert main(["convert", str(ckpt), "-o", str(root / "bundle")]) == 0
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["parscale_n"] == (1 if choice["model_type"] == "qwen2" else choice["parscale_n"])
    ids = np.array([[0, 0, 5, 9, 13], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        Runtime(root / "bundle").greedy(ids, mask, 4), Reference.from_checkpoint(ckpt).greedy(ids, mask, 4)
    )
