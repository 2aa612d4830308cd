"""Integer weights in MatMulNBits' layout: packing a float matrix into symmetric blocks, and the
float matrix a packed one stands for.

Both sides of validation need this arithmetic: the exporter packs the bundle's weights, and the
PyTorch reference of validation's exact phases multiplies by what those packed weights mean.
It lives here, below both, so that neither reads the other: the oracle does not lean on the code
it checks. Packing is ONNX Runtime's own kernel (the one its MatMulNBitsQuantizer calls), so a
bundle holds bitwise what ONNX Runtime would have made; unpacking is plain numpy, written from
the op's documented layout and proven against the op itself (tests/test_quantize.py).

Layout, for a weight W [K, N] (MatMul's B: K inputs, N outputs), blocks of BLOCK_SIZE along K:
  packed  uint8 [N, K/32, 32*bits/8]  int4: two values a byte, low nibble first
  scales  float [N, K/32]             one per block; symmetric: W ~ (q - 2^(bits-1)) * scale
A K that is not a multiple of 32 is padded with zeros to the next block.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32


def blocks(k: int) -> int:
    """Blocks along an input dimension of `k`."""
    return (k + BLOCK_SIZE - 1) // BLOCK_SIZE


def pack(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of float32 `weight` [K, N] along K: packed
    [N, K/32, 32*bits/8] uint8 and scales [N, K/32] float32. Columns are independent, so a
    matrix may be packed a slice of columns at a time."""
    k, n = weight.shape
    count = blocks(k)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if count * BLOCK_SIZE != k:
        weight = np.pad(weight, ((0, count * BLOCK_SIZE - k), (0, 0)))
    packed = np.zeros((n, count, BLOCK_SIZE * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, count), dtype=np.float32)
    zero_points = np.zeros((n, (count + 8 // bits - 1) // (8 // bits)), dtype=np.uint8)  # unused: symmetric
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, weight, scales, zero_points, BLOCK_SIZE, n, k, True)
    return packed, scales


def unpack(packed: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """What MatMulNBits multiplies by, as float32 rows [N, K] (row n: output n's weights, the
    layout of a Linear's weight), from `packed` and `scales` as the graph stores them (scales in
    the graph's dtype): each value minus the implicit zero point (8 for int4, 128 for int8),
    times its block's scale."""
    n, count = scales.shape
    rows = np.empty((n, count, BLOCK_SIZE), dtype=np.float32)
    if bits == 4:  # two values a byte, low nibble first
        rows[..., 0::2] = packed & 0x0F
        rows[..., 1::2] = packed >> 4
    else:
        rows[...] = packed
    rows -= 1 << (bits - 1)
    rows *= scales.astype(np.float32)[:, :, None]
    return rows.reshape(n, -1)[:, :k]


def dequantized(weight: np.ndarray, bits: int, scale_dtype: type[np.floating] = np.float32) -> np.ndarray:
    """What a MatMulNBits node made from `weight` [K, N] multiplies by, also [K, N]: packed,
    scales rounded to `scale_dtype` as the graph stores them, and unpacked."""
    packed, scales = pack(weight, bits)
    return unpack(packed, scales.astype(scale_dtype), weight.shape[0], bits).T
