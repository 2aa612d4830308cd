"""Safetensors weights (one file or index + shards) -> named tensors, checked against the config.

Safetensors only: pickle files (`*.bin`, `*.pt`) can run code when loaded, so they are refused.
Every check names the tensor or file at fault. The expected names and shapes are one table
(`expected_shapes`) derived from the config, as in the official `modeling_qwen2_parscale.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .jsonfile import read_json_object
from .tensorfile import DTYPES, ITEM_SIZES, TensorFile

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Buffers some checkpoints carry that the model recomputes; harmless to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape."""
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.q_proj.bias": (q_out,),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.k_proj.bias": (kv_out,),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.bias": (kv_out,),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        }
        if config.parscale_n > 1:
            prefix = (config.parscale_n, config.num_kv_heads, config.parscale_n_tokens, d)
            shapes |= {p + "self_attn.prefix_k": prefix, p + "self_attn.prefix_v": prefix}
    shapes["model.norm.weight"] = (h,)
    if config.parscale_n > 1:
        n = config.parscale_n
        shapes |= {
            "model.aggregate_layer.0.weight": (h, n * h),
            "model.aggregate_layer.0.bias": (h,),
            "model.aggregate_layer.2.weight": (n, h),
            "model.aggregate_layer.2.bias": (n,),
        }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it (index-aware, path-safe)."""
    root = Path(checkpoint_dir)
    index_path, single = root / INDEX_FILE, root / SINGLE_FILE
    if index_path.is_file():
        return _read_index(index_path)
    if single.is_file():
        return dict.fromkeys(_tensor_names(single), single)
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in root.glob(pattern))
    if pickles:
        raise CheckpointError(
            f"{root}: only pickle weights ({', '.join(pickles)}); they can execute code when loaded, "
            "so they are refused. Re-save the model as safetensors (save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory")


def _read_index(index_path: Path) -> dict[str, Path]:
    root = index_path.parent.resolve()
    weight_map = read_json_object(index_path, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: malformed index (no weight_map object)")
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name")
        path = (root / shard).resolve()
        if Path(shard).is_absolute() or not path.is_relative_to(root):
            raise CheckpointError(f"{index_path}: shard {shard!r} points outside the checkpoint directory")
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} is listed but missing")
        files[name] = path
    for path in set(files.values()):
        held = set(_tensor_names(path))
        listed = {name for name, p in files.items() if p == path}
        if listed - held:
            missing = sorted(listed - held)[0]
            raise CheckpointError(f"{path}: index lists tensor {missing!r} but the shard does not hold it")
    return files


def _tensor_names(path: Path) -> list[str]:
    return TensorFile(path).names()


class Checkpoint:
    """A checkpoint's tensors, checked against the config before any is read, then read on demand:
    a whole tensor, or rows of one, converted to a dtype (convert streams weights this way, so
    memory holds a slice of one tensor, not the model).

    Construction reads only headers and raises CheckpointError for a missing, unexpected,
    mis-shaped or non-float tensor, naming it; `read` raises it for non-finite values or values
    that overflow the dtype asked for. `shapes` is every tensor the model reads, in
    expected_shapes' order."""

    def __init__(self, checkpoint_dir: Path, config: ModelConfig) -> None:
        files = weight_files(checkpoint_dir)
        expected = expected_shapes(config)
        names = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}
        if config.tie_word_embeddings:
            names.discard("lm_head.weight")  # tied: the head is the embedding, as in the official model
        missing = sorted(set(expected) - names)
        if missing:
            raise CheckpointError(
                f"{_missing_hint(files, checkpoint_dir)}: missing tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        unexpected = sorted(names - set(expected))
        if unexpected:
            raise CheckpointError(
                f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} for this config "
                f"(parscale_n={config.parscale_n}, layers={config.num_layers})"
            )
        opened: dict[Path, TensorFile] = {}
        self.files: dict[str, TensorFile] = {}
        for name, shape in expected.items():
            tensors = self.files[name] = opened.setdefault(files[name], TensorFile(files[name]))
            entry = tensors.entries[name]
            if entry.shape != shape:
                raise CheckpointError(
                    f"{tensors.path}: tensor {name!r} has shape {list(entry.shape)}, the config implies {list(shape)}"
                )
            if entry.dtype not in DTYPES:
                raise CheckpointError(
                    f"{tensors.path}: tensor {name!r} has dtype {entry.dtype}; expected F32, F16 or BF16"
                )
        self.shapes = expected

    def read(self, name: str, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop (along the first axis) of tensor `name`, converted to `dtype` and checked."""
        tensors = self.files[name]
        entry = tensors.entries[name]
        rows, *rest = entry.shape
        stop = rows if stop is None else stop
        row_bytes = math.prod(rest) * ITEM_SIZES[entry.dtype]
        buffer = bytearray((stop - start) * row_bytes)
        if buffer:
            try:
                with tensors.path.open("rb") as f:
                    f.seek(entry.begin + start * row_bytes)
                    if f.readinto(buffer) != len(buffer):
                        raise CheckpointError(f"{tensors.path}: tensor {name!r} is cut short; is the file truncated?")
            except OSError as exc:
                raise CheckpointError(f"{tensors.path}: {exc.strerror or exc}") from None
            tensor = torch.frombuffer(buffer, dtype=DTYPES[entry.dtype]).reshape(stop - start, *rest)
        else:
            tensor = torch.empty((stop - start, *rest), dtype=DTYPES[entry.dtype])
        return _checked(tensors.path, name, tensor, dtype)


def load_weights(
    checkpoint_dir: Path,
    config: ModelConfig,
    on_tensor: Callable[[int, int], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Load and check every expected tensor, converted to `dtype` one tensor at a time.

    Raises CheckpointError for a missing, unexpected, mis-shaped, wrongly typed or non-finite
    tensor (or one that overflows `dtype`), naming it. `on_tensor(done, total)` reports progress.
    """
    checkpoint = Checkpoint(checkpoint_dir, config)
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(checkpoint.shapes, key=lambda n: str(checkpoint.files[n].path)):  # file by file
        weights[name] = checkpoint.read(name, dtype)
        if on_tensor:
            on_tensor(len(weights), len(checkpoint.shapes))
    return {name: weights[name] for name in checkpoint.shapes}


def _checked(path: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
    converted = tensor.to(dtype)
    if not torch.isfinite(converted).all():
        raise CheckpointError(f"{path}: tensor {name!r} holds values too large for {dtype}")
    return converted


def _missing_hint(files: dict[str, Path], checkpoint_dir: Path) -> Path:
    """The file to name when a tensor is absent: the index if there is one, else the directory."""
    index = Path(checkpoint_dir) / INDEX_FILE
    return index if index.is_file() else Path(checkpoint_dir) / SINGLE_FILE


def weights_digest(checkpoint_dir: Path) -> str:
    """sha256 over the weight files (sorted by name), so a bundle records exactly what it came from."""
    digest = hashlib.sha256()
    for path in sorted(set(weight_files(checkpoint_dir).values())):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
