"""Weight-only quantization of the linear layers: ONNX Runtime's MatMulNBits (int8 or int4).

Every MatMul whose weight is a constant becomes MatMulNBits with symmetric blocks of 32 along
the input dimension; embeddings, norms, biases, the prefix and the cache stay in the export
dtype. accuracy_level 4 lets the CPU kernels use int8 activations: measured here it decoded
1.7x faster than accuracy_level 0 with the same drift.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .bundle import DATA_FILE

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4


def quantize_in_place(model_path: Path, scheme: str) -> dict:
    """Rewrite model.onnx (+ data) at `model_path` with quantized linear weights; returns the
    manifest's description of what was done."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    bits = BITS[scheme]
    model = onnx.load(str(model_path))
    settings = dict(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, **settings, algo_config=DefaultWeightOnlyQuantConfig(**settings))
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every node it visits
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    (model_path.parent / DATA_FILE).unlink()
    quantizer.model.save_model_to_file(str(model_path), use_external_data_format=True)
    del model
    quantized = sum(
        1 for node in onnx.load(str(model_path), load_external_data=False).graph.node if node.op_type == "MatMulNBits"
    )
    return {"scheme": scheme, "op": "MatMulNBits", "bits": bits, "block_size": BLOCK_SIZE, "symmetric": True,
            "accuracy_level": ACCURACY_LEVEL, "quantized_matmuls": quantized}  # fmt: skip
