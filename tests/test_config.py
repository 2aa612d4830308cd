"""config.json parsing: what is accepted, and the one-line error for what is not."""

from __future__ import annotations

import json
import re

import pytest

from parscale_export.config import load_config, parse_config
from parscale_export.errors import ConfigError
from parscale_export.synthetic import parscale_config


def test_official_fields_are_read() -> None:
    c = parse_config(parscale_config(parscale_n=8, parscale_n_tokens=48, parscale_attn_smooth=0.0))
    assert (c.parscale_n, c.parscale_n_tokens, c.parscale_attn_smooth) == (8, 48, 0.0)
    assert c.head_dim == 16 and c.rope_type == "default"


def test_plain_qwen2_is_p1_whatever_it_says() -> None:
    c = parse_config(parscale_config(model_type="qwen2", parscale_n=4))
    assert (c.parscale_n, c.parscale_n_tokens) == (1, 0)


def test_explicit_head_dim_wins() -> None:
    assert parse_config(parscale_config(head_dim=32)).head_dim == 32


def test_transformers5_rope_parameters_form() -> None:
    raw = parscale_config(rope_scaling=None, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    c = parse_config(raw)
    assert c.rope_type == "linear" and c.rope_theta == 1e6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer"),
        ({"parscale_n": 0}, "parscale_n must be a positive integer"),
        ({"parscale_n_tokens": -1}, "parscale_n_tokens must be a positive integer"),
        ({"parscale_attn_smooth": 1.5}, "parscale_attn_smooth"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "run time"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "not supported"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"head_dim": 7}, "head_dim 7 must be even"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ],
)
def test_invalid_configs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(parscale_config(**change))


def test_missing_field() -> None:
    raw = parscale_config()
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="missing required field 'vocab_size'"):
        parse_config(raw)


def test_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match=re.escape("no config.json")):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(parscale_config(model_type="bert")))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "config.json"))):
        load_config(tmp_path)
