"""config.json -> a frozen, validated model configuration.

Everything the exporter knows about a model comes from here; nothing is inferred from file
names or paths. A plain Qwen2 checkpoint (`model_type: qwen2`) is the P=1 case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonfile import read_json_object

SUPPORTED_MODEL_TYPES = ("qwen2_parscale", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
SOURCE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and semantics of one ParScale (or plain Qwen2) checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    parscale_n: int  # P: parallel streams; 1 means plain Qwen2
    parscale_n_tokens: int  # T: learned prefix slots per stream and layer (0 when P == 1)
    parscale_attn_smooth: float
    source_dtype: str
    # rope_scaling as written in the config, with "type" normalised to "rope_type"; None = default
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]


def load_config(checkpoint_dir: Path) -> ModelConfig:
    """Read and validate `checkpoint_dir/config.json`; every problem is a ConfigError naming the file."""
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"{checkpoint_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint directory")
    raw = read_json_object(path, ConfigError)
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate a config.json dictionary. Messages name the offending field."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (Qwen2 uses 'silu')")
    if raw.get("use_sliding_window", False):
        raise ConfigError("use_sliding_window=true is not supported (the official model does not apply it either)")
    if _number(raw, "partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor other than 1.0 is not supported")

    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    head_dim = _int(raw, "head_dim") if raw.get("head_dim") is not None else hidden // heads
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} must be even and at least 2 (rotary halves)")
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")

    if model_type == "qwen2":
        parscale_n, n_tokens, smooth = 1, 0, 0.0
    else:
        parscale_n = _int(raw, "parscale_n", 1)
        n_tokens = _int(raw, "parscale_n_tokens", 48) if parscale_n > 1 else 0
        smooth = _number(raw, "parscale_attn_smooth", 0.01)
        if not 0.0 <= smooth < 1.0:
            raise ConfigError(f"parscale_attn_smooth must be in [0, 1), got {smooth}")

    dtype = raw.get("torch_dtype", raw.get("dtype", "float32"))
    if dtype not in SOURCE_DTYPES:
        raise ConfigError(f"torch_dtype {dtype!r} is not supported; expected one of {', '.join(SOURCE_DTYPES)}")
    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"tie_word_embeddings must be true or false, got {tie!r}")

    rope_theta, rope_scaling = _rope(raw)
    eps = _number(raw, "rms_norm_eps", 1e-6)
    if eps <= 0:
        raise ConfigError(f"rms_norm_eps must be positive, got {eps}")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=rope_theta,
        max_position_embeddings=_int(raw, "max_position_embeddings", 32768),
        tie_word_embeddings=tie,
        parscale_n=parscale_n,
        parscale_n_tokens=n_tokens,
        parscale_attn_smooth=smooth,
        source_dtype=dtype,
        rope_scaling=rope_scaling,
    )


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling). Accepts the 4.x `rope_scaling` and the 5.x `rope_parameters` forms."""
    theta = _number(raw, "rope_theta", 10000.0)
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if scaling is None and isinstance(params, dict):
        theta = _number(params, "rope_theta", theta)
        scaling = params
    if theta <= 1:
        raise ConfigError(f"rope_theta must be greater than 1, got {theta}")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = " (it changes frequencies with the sequence length at run time)" if "dynamic" in str(rope_type) else ""
        raise ConfigError(
            f"rope_scaling type {rope_type!r} is not supported{why}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling["rope_type"] = rope_type
    factor = _number(scaling, "factor")
    if (factor < 1.0 and rope_type != "linear") or factor <= 0:
        raise ConfigError(f"rope_scaling.factor {factor} is out of range for {rope_type!r}")
    if rope_type == "yarn":
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if scaling.get(key) is not None and _number(scaling, key) < 0:
                raise ConfigError(f"rope_scaling.{key} must not be negative")
        if scaling.get("original_max_position_embeddings") is not None:
            _int(scaling, "original_max_position_embeddings")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if _number(scaling, key) <= 0:
                raise ConfigError(f"rope_scaling.{key} must be positive")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")
    return theta, scaling


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"missing required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _number(raw: dict[str, Any], key: str, default: float | None = None) -> float:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"missing required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def special_tokens(checkpoint_dir: Path) -> dict[str, list[int]]:
    """eos/bos/pad ids from generation_config.json, falling back to config.json; lists, maybe empty."""
    found: dict[str, list[int]] = {"eos_token_id": [], "bos_token_id": [], "pad_token_id": []}
    for name in ("config.json", "generation_config.json"):  # the later file wins
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            continue
        raw = read_json_object(path, ConfigError)
        for key in found:
            value = raw.get(key)
            ids = value if isinstance(value, list) else [value]
            ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
            if ids:
                found[key] = ids
    return found
