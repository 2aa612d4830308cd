"""The PyTorch reference behind the same calls as the ONNX runtime (see stepping.Stepper).

It runs `model.ParScaleForCausalLM` in float32 with weights upcast from the checkpoint, the
precision the official conformance outputs were computed in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_weights
from .config import load_config
from .intweights import BITS, dequantized
from .model import ParScaleForCausalLM, build_model
from .stepping import Stepper, positions


class Reference(Stepper):
    def __init__(self, model: ParScaleForCausalLM) -> None:
        self.model = model

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Path, quantization: str | None = None, scale_dtype: type[np.floating] = np.float32
    ) -> Reference:
        """The model in float32. With `quantization` ("int8", "int4"), every linear layer's weight
        (a tied head's too, untied from the embedding) is replaced by what a bundle quantized
        that way holds, scales rounded to `scale_dtype` (the bundle's): the reference of
        validation's exact phases."""
        config = load_config(checkpoint_dir)
        model = build_model(config, load_weights(checkpoint_dir, config))
        if quantization:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    weight = dequantized(module.weight.numpy().T, BITS[quantization], scale_dtype).T
                    module.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight)), requires_grad=False)
        return cls(model)

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
