"""The PyTorch reference behind the same calls as the ONNX runtime (see stepping.Stepper).

It runs `model.ParScaleForCausalLM` in float32 with weights upcast from the checkpoint, the
precision the official conformance outputs were computed in. Two ways, the same arithmetic:
  whole   every weight in memory (4 bytes a parameter: 19 GB for the 4.7B model)
  layers  each decoder layer's weights read from the checkpoint as the layer runs and dropped
          after it; the embedding reads only the rows of the ids it is given; the head reads
          its weight a band of rows at a time. Memory: one layer, not the model. Every call
          reads the checkpoint again (from the page cache, when it fits there).
`from_checkpoint` picks `layers` when the float32 model would take more than a quarter of the
memory available, unless told which.

With `quantization`, every linear layer's weight (a tied head's too, untied from the embedding)
is what a bundle quantized that way multiplies by (intweights.pack, then unpack): the reference
of validation's exact phases. Layer by layer, each weight is packed once, kept packed in a
scratch folder (a quarter or an eighth of its float32 size, in the page cache) and unpacked as
its layer runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import Checkpoint, expected_shapes, load_weights
from .config import ModelConfig, load_config
from .intweights import BITS, pack, unpack
from .model import ParScaleForCausalLM, RotaryEmbedding, build_model, stacked_names
from .stepping import Stepper, positions

WAYS = ("auto", "whole", "layers")
BAND_BYTES = 64 << 20  # float32 weight rows a band of the head holds


class Reference(Stepper):
    def __init__(self, model: ParScaleForCausalLM, how: str = "whole") -> None:
        self.model = model
        self.how = how  # "whole" or "layers" (see the module docstring)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: Path,
        quantization: str | None = None,
        scale_dtype: type[np.floating] = np.float32,
        way: str = "auto",
    ) -> Reference:
        """The model in float32, held `way` ("whole", "layers", or "auto": see the module
        docstring). With `quantization` ("int8", "int4"), its linear weights are what a bundle
        quantized that way holds, scales rounded to `scale_dtype` (the bundle's): the
        reference of validation's exact phases."""
        config = load_config(checkpoint_dir)
        if way == "auto":
            way = "layers" if float32_bytes(config) > available_memory() / 4 else "whole"
        bits = BITS[quantization] if quantization else None
        if way == "layers":
            return cls(_layered_model(config, Checkpoint(checkpoint_dir, config), bits, scale_dtype), "layers")
        model = build_model(config, load_weights(checkpoint_dir, config))
        if bits:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight = nn.Parameter(_dequantized(module.weight, bits, scale_dtype), requires_grad=False)
        return cls(model, "whole")

    @torch.inference_mode()
    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[torch.Tensor]
    ) -> tuple[np.ndarray, list[torch.Tensor]]:
        pairs = list(zip(past[0::2], past[1::2], strict=True))
        logits, presents = self.model(
            torch.from_numpy(input_ids),
            torch.from_numpy(attention_mask),
            torch.from_numpy(positions(attention_mask, input_ids.shape[1])),
            pairs,
        )
        return logits.numpy(), [t for kv in presents for t in kv]

    def empty_past(self, batch: int, tokens: int | None = None) -> list[torch.Tensor]:
        return [t for kv in self.model.empty_cache(batch) for t in kv]


def float32_bytes(config: ModelConfig) -> int:
    """The float32 model's weights in bytes."""
    return 4 * sum(int(np.prod(shape)) for shape in expected_shapes(config).values())


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (physical memory where that is unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _dequantized(weight: Tensor, bits: int, scale_dtype: type[np.floating]) -> Tensor:
    """A Linear's weight [out, in] as MatMulNBits holds it, a band of rows at a time (rows are
    independent: each is its own output's blocks)."""
    rows, k = weight.shape
    step = max(1, BAND_BYTES // (4 * k))
    out = torch.empty_like(weight, dtype=torch.float32)
    for start in range(0, rows, step):
        band = weight[start : start + step].float().numpy()
        packed, scales = pack(band.T, bits)
        out[start : start + step] = torch.from_numpy(unpack(packed, scales.astype(scale_dtype), k, bits))
    return out


class _Packed:
    """Quantized weights packed once, kept in a scratch folder, unpacked each time they are used."""

    def __init__(self, bits: int, scale_dtype: type[np.floating]) -> None:
        self.bits, self.scale_dtype = bits, scale_dtype
        self.folder = tempfile.TemporaryDirectory(prefix="parscale-reference-")  # removed with this object

    def __call__(self, key: str, rows: Callable[[], Tensor]) -> Tensor:
        path = Path(self.folder.name) / f"{key}.npz"
        if not path.is_file():
            weight = rows().numpy()
            packed, scales = pack(weight.T, self.bits)
            with path.open("wb") as f:
                np.savez(f, packed=packed, scales=scales.astype(self.scale_dtype), k=weight.shape[1])
            del weight
        with np.load(path) as stored:
            return torch.from_numpy(unpack(stored["packed"], stored["scales"], int(stored["k"]), self.bits))


def _layered_model(
    config: ModelConfig, checkpoint: Checkpoint, bits: int | None, scale_dtype: type[np.floating]
) -> ParScaleForCausalLM:
    """The model with only its small parts in memory (final norm, aggregation, rotary
    frequencies); each layer loads its weights as it runs (forward hooks, which also keep the
    scratch folder of packed weights alive), the embedding and the head read theirs from the
    checkpoint on every call."""
    with torch.device("meta"):
        model = ParScaleForCausalLM(config)
    model.model.rotary_emb = RotaryEmbedding(config)
    packed = _Packed(bits, scale_dtype) if bits else None
    streamed = ("model.layers.", "model.embed_tokens.", "lm_head.")
    resident = {n: checkpoint.read(n, torch.float32) for n in checkpoint.shapes if not n.startswith(streamed)}
    if packed:  # the aggregation MLP's two Linears
        for name in [n for n in resident if n.startswith("model.aggregate_layer.") and n.endswith(".weight")]:
            resident[name] = packed(name, lambda name=name: resident[name])
    missing, unexpected = model.load_state_dict(resident, strict=False, assign=True)
    assert not unexpected and all(n.startswith(streamed) for n in missing), (missing, unexpected)
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    model.model.embed_tokens = _EmbeddingRows(checkpoint, "model.embed_tokens.weight")
    model.lm_head = _BandedHead(checkpoint, head, packed)
    for index, layer in enumerate(model.model.layers):
        loader = _LayerLoader(checkpoint, config, index, packed)
        layer.register_forward_pre_hook(loader.load)
        layer.register_forward_hook(loader.drop)
    return model.eval().requires_grad_(False)


class _LayerLoader:
    """Loads decoder layer `index`'s weights (q/k/v and gate/up stacked, as build_model stacks
    them) just before it runs; puts them back on the meta device after."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, index: int, packed: _Packed | None) -> None:
        self.checkpoint, self.packed = checkpoint, packed
        self.prefix = prefix = f"model.layers.{index}."
        stacks = {fused: parts for fused, parts in stacked_names(config.num_layers).items()
                  if fused.startswith(prefix) and parts[0] in checkpoint.shapes}  # fmt: skip
        stacked = {part for parts in stacks.values() for part in parts}
        own = {name: [name] for name in checkpoint.shapes if name.startswith(prefix) and name not in stacked}
        self.sources = {name.removeprefix(prefix): parts for name, parts in (own | stacks).items()}

    def _read(self, parts: list[str]) -> Tensor:
        tensors = [self.checkpoint.read(part, torch.float32) for part in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    def load(self, layer: nn.Module, args: tuple) -> None:
        state = {}
        for name, parts in self.sources.items():
            if self.packed and name.endswith("proj.weight"):  # every Linear's weight
                state[name] = self.packed(self.prefix + name, lambda parts=parts: self._read(parts))
            else:
                state[name] = self._read(parts)
        layer.load_state_dict(state, assign=True)

    def drop(self, layer: nn.Module, args: tuple, output) -> None:
        layer.to_empty(device="meta")


class _EmbeddingRows(nn.Module):
    """nn.Embedding whose table stays in the checkpoint: reads the rows of the ids asked for."""

    def __init__(self, checkpoint: Checkpoint, name: str) -> None:
        super().__init__()
        self.checkpoint, self.name = checkpoint, name

    def forward(self, ids: Tensor) -> Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.cat([self.checkpoint.read(self.name, torch.float32, i, i + 1) for i in unique.tolist()])
        return rows[inverse]


class _BandedHead(nn.Module):
    """The LM head (a Linear without bias) whose weight [vocab, hidden] stays in the checkpoint:
    each call multiplies by a band of its rows at a time. `weight` is only its shape and dtype."""

    def __init__(self, checkpoint: Checkpoint, name: str, packed: _Packed | None) -> None:
        super().__init__()
        self.checkpoint, self.name, self.packed = checkpoint, name, packed
        self.weight = torch.empty(checkpoint.shapes[name], device="meta")

    def forward(self, x: Tensor) -> Tensor:
        vocab, hidden = self.weight.shape
        step = max(1, BAND_BYTES // (4 * hidden))
        out = x.new_empty(*x.shape[:-1], vocab)
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)

            def rows(start: int = start, stop: int = stop) -> Tensor:
                return self.checkpoint.read(self.name, torch.float32, start, stop)

            band = self.packed(f"head-{start}", rows) if self.packed else rows()
            out[..., start:stop] = F.linear(x, band)
        return out
