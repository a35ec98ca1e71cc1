"""MLX's affine quantization in NumPy, both ways, the one implementation mlxft uses: the
PyTorch backend's loader for `mlx-community/*-4bit` models (sources/mlx_quant.py), fuse and
export read quantized weights through `dequantize`, and `mlxft fuse --quantize` writes them with
`quantize`. No mlx needed.

mlx-lm stores a quantized linear layer as `<name>.weight` (uint32 words holding `bits`-bit codes,
little-endian bit stream per row), `<name>.scales` and `<name>.biases` (one per group of
`group_size` inputs); the weight is scales * code + biases, as `mx.dequantize` computes.
"""

from __future__ import annotations

import numpy as np


def dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """MLX affine quantization -> float32: values packed little-endian in uint32 words,
    w = q * scale + bias per group of `group_size` along the input dimension."""
    out = wq.shape[0]
    bitstream = np.unpackbits(np.ascontiguousarray(wq, dtype="<u4").view(np.uint8), bitorder="little")
    q = bitstream.reshape(-1, bits).astype(np.uint32) @ (1 << np.arange(bits, dtype=np.uint32))
    q = q.reshape(out, -1, group_size).astype(np.float32)
    w = q * scales[..., None] + biases[..., None]
    return w.reshape(out, -1)


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (out, in) -> (packed uint32, scales, biases) in MLX's affine layout."""
    out, n_in = w.shape
    g = w.reshape(out, n_in // group_size, group_size).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    n_bins = (1 << bits) - 1
    scales = np.maximum(hi - lo, 1e-8) / n_bins
    q = np.clip(np.round((g - lo[..., None]) / scales[..., None]), 0, n_bins).astype(np.uint32)
    bitsarr = ((q.reshape(-1, 1) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    packed = np.packbits(bitsarr.reshape(-1), bitorder="little").view("<u4")
    return packed.reshape(out, -1), scales.astype(np.float32), lo.astype(np.float32)
