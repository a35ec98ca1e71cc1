"""Measured matmul speed of this machine per backend and dtype, for `mlxft doctor --bench` and
the model-FLOPs-utilisation estimate in training progress."""

from __future__ import annotations

import time


def _time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(m: int = 512, k: int = 576, n: int = 1536) -> list[dict]:
    """GFLOPS of an (m x k) @ (k x n) product, shapes like a small model's MLP."""
    rows = []
    flops = 2 * m * k * n
    try:
        import torch

        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            rows.append({"backend": "torch", "dtype": str(dtype).replace("torch.", ""), "shape": f"{m}x{k}x{n}",
                         "gflops": flops / _time(lambda: a @ b) / 1e9})
    except ImportError:
        pass
    try:
        import mlx.core as mx

        for dtype in (mx.float32, mx.bfloat16):
            a, b = mx.random.normal((m, k)).astype(dtype), mx.random.normal((k, n)).astype(dtype)
            rows.append({"backend": "mlx", "dtype": str(dtype).replace("mlx.core.", ""), "shape": f"{m}x{k}x{n}",
                         "gflops": flops / _time(lambda: mx.eval(a @ b)) / 1e9})
    except ImportError:
        pass
    return rows
