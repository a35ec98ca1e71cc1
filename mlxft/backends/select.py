"""Choosing a backend: `auto` is MLX when the Apple GPU (Metal) is available, else PyTorch
(CUDA when present, else CPU). Probes avoid importing torch or mlx unless needed."""

from __future__ import annotations

import importlib.util
import platform

from mlxft.config import Config
from mlxft.errors import MlxftError


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def metal_available() -> bool:
    if platform.system() != "Darwin" or platform.machine() != "arm64" or not module_available("mlx"):
        return False
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except Exception:
        return False


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend name, why)."""
    if requested == "torch":
        if not module_available("torch") or not module_available("peft"):
            raise MlxftError("--backend torch: PyTorch backend not installed", "pip install 'mlxft[torch]'")
        return "torch", "requested"
    if requested == "mlx":
        if not module_available("mlx") or not module_available("mlx_lm"):
            raise MlxftError("--backend mlx: MLX backend not installed",
                             "pip install 'mlxft[mlx]' (macOS) or 'mlxft[mlx-cpu]' / 'mlxft[mlx-cuda]' (Linux)")
        return "mlx", "requested"
    if requested != "auto":
        raise MlxftError(f"--backend {requested}: unknown backend (choose auto, torch or mlx)")
    if metal_available() and module_available("mlx_lm"):
        return "mlx", "Apple GPU (Metal) available"
    if module_available("torch") and module_available("peft"):
        return "torch", "no Metal GPU; PyTorch installed"
    if module_available("mlx") and module_available("mlx_lm"):
        return "mlx", "no Metal GPU and no PyTorch; MLX on CPU/CUDA (slow on CPU)"
    raise MlxftError("no training backend installed", "pip install 'mlxft[torch]' or 'mlxft[mlx]'")


def make_backend(name: str, cfg: Config, world=None):
    if name == "torch":
        from mlxft.backends.torch_backend import TorchBackend

        return TorchBackend(cfg, world=world)
    if name == "mlx":
        from mlxft.backends.mlx_backend import MLXBackend

        return MLXBackend(cfg, world)
    raise MlxftError(f"unknown backend '{name}'")
