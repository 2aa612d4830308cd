"""Deterministic random checkpoints in the published layout, for fixtures, tests and benchmarks.

Weights are scaled so logits have real spread (1/sqrt(fan_in) for linear layers): with the
official 0.02 init the logits are nearly flat and greedy ties could flip between runtimes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, SINGLE_FILE, expected_shapes
from .config import parse_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parscale_config(
    *,
    parscale_n: int = 4,
    parscale_n_tokens: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 260,
    **extra: Any,
) -> dict[str, Any]:
    """A config.json dictionary shaped like the official one; `extra` overrides or adds fields."""
    return {
        "architectures": ["Qwen2ParScaleForCausalLM"],
        "model_type": "qwen2_parscale",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "parscale_n": parscale_n,
        "parscale_n_tokens": parscale_n_tokens,
        "parscale_attn_smooth": 0.01,
        "torch_dtype": "float32",
        **extra,
    }


def random_weights(
    raw_config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Tensors for every name the config implies, drawn in float32 from a seeded generator and
    cast one at a time (a 1.8B model never exists in float32 all at once)."""
    config = parse_config(raw_config)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("prefix_k", "prefix_v", "embed_tokens.weight")):
            tensor = torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            tensor = 0.1 * torch.randn(shape, generator=gen)
        else:
            tensor = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        weights[name] = tensor.to(dtype).contiguous()
    return weights


def write_checkpoint(
    directory: Path,
    raw_config: dict[str, Any],
    seed: int = 0,
    shards: int = 1,
    generation_config: dict[str, Any] | None = None,
    backbone: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json, weights (in the config's torch_dtype; sharded with an index when
    `shards` > 1) and a generation_config.json. Returns the directory. Tensors in `backbone`
    replace the random ones of the same name (a family of checkpoints sharing a backbone)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[raw_config.get("torch_dtype", "float32")]
    weights = random_weights(raw_config, seed, dtype)
    weights |= {name: tensor for name, tensor in (backbone or {}).items() if name in weights}
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    gen = generation_config if generation_config is not None else {"eos_token_id": raw_config["vocab_size"] - 1}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if shards == 1:
        save_file(weights, directory / SINGLE_FILE, metadata={"format": "pt"})
        return directory
    names = list(weights)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def plain_config(raw_config: dict[str, Any]) -> dict[str, Any]:
    """The plain Qwen2 (P=1) config with the backbone of a ParScale config."""
    plain = {k: v for k, v in raw_config.items() if not k.startswith("parscale_")}
    return plain | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def write_family(root: Path, raw_config: dict[str, Any], sizes: tuple[int, ...], seed: int = 0) -> list[Path]:
    """Checkpoints root/p{P} for each P in `sizes`, sharing one backbone drawn from `seed`: what
    the released ParScale models are (a frozen Qwen2.5 with trained prefixes and aggregation).
    P=1 is written as a plain Qwen2 checkpoint; each P's own tensors are drawn from seed + P."""
    base = plain_config(raw_config)
    backbone = random_weights(base, seed, DTYPES[base.get("torch_dtype", "float32")])
    paths = []
    for n in sizes:
        config = base if n == 1 else raw_config | {"parscale_n": n}
        paths.append(write_checkpoint(Path(root) / f"p{n}", config, seed=seed + n, backbone=backbone))
    return paths
