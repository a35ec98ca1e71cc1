"""The preference operations of the backend in use (PyTorch or MLX), chosen by its name."""

from __future__ import annotations

import importlib


def ops_for(backend):
    """The module with row_logps, pair_logps, adapter_off and train_step for `backend`."""
    module = {"torch": "mlxft.preference.torch_ops", "mlx": "mlxft.preference.mlx_ops"}.get(backend.name)
    if module is None:
        raise ValueError(f"preference tuning is not implemented for the {backend.name} backend")
    return importlib.import_module(module)
