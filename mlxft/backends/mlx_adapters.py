"""PEFT <-> MLX adapter conversion for the MLX backend (the PEFT file itself is read by
mlxft/adapters.py, which gives every module its rank and scale).

mlx-lm's LoRALinear / DoRALinear keep `lora_a` (in, r), `lora_b` (r, out) and a `scale`, and
DoRA's magnitude `m` (out,). PEFT keeps `lora_A.weight` (r, in), `lora_B.weight` (out, r) and
`lora_alpha` with scale = alpha / r (alpha / sqrt(r) with rsLoRA), DoRA's `lora_magnitude_vector`
(out,). Keys are the HF module paths under `base_model.model.`, which the supported mlx-lm model
classes share with transformers, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxft.adapters import PREFIX, linear_factors, peft_config, write_adapter
from mlxft.errors import ModelError


def lora_modules(model) -> dict:
    """{module path: LoRALinear | DoRALinear} in the model."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def set_module(model, path: str, new) -> None:
    """Replace the submodule at dotted `path` (list indices for numeric parts)."""
    parts = path.split(".")
    parent = model
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        parent[last] = new


def to_peft(model, base_model: str, dropout: float = 0.0) -> tuple[dict, dict]:
    """(adapter_config dict, {PEFT key: float32 numpy}) for every LoRA/DoRA layer in `model`."""
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear

    mods = lora_modules(model)
    if not mods:
        raise ModelError("the model has no LoRA layers to save")
    tensors, ranks, alphas = {}, {}, {}
    use_dora = False
    for path, m in mods.items():
        a = np.array(m.lora_a.astype(mx.float32))
        b = np.array(m.lora_b.astype(mx.float32))
        tensors[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if isinstance(m, DoRALinear):
            use_dora = True
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = np.array(m.m.astype(mx.float32))
        ranks[path] = a.shape[1]
        alphas[path] = float(m.scale) * a.shape[1]
    config = peft_config(base_model, ranks, alphas, dropout=dropout, use_dora=use_dora,
                         n_layers=len(getattr(model, "layers", [])))
    return config, tensors


def save_peft(model, path: Path, base_model: str, dropout: float = 0.0) -> None:
    config, tensors = to_peft(model, base_model, dropout)
    write_adapter(Path(path), config, tensors)


def apply_peft(model, path: Path, dropout: float | None = None) -> dict:
    """Wrap the adapted linear layers of `model` with mlx-lm LoRA/DoRA layers and load the PEFT
    adapter at `path` into them. Returns the adapter config."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    path = Path(path)
    cfg, groups = linear_factors(path, "the MLX backend")
    use_dora = bool(cfg.get("use_dora"))
    drop = float(cfg.get("lora_dropout", 0.0) if dropout is None else dropout)
    modules = dict(model.named_modules())
    for module, parts in sorted(groups.items()):
        base = modules.get(module)
        if base is None:
            raise ModelError(f"{path}: adapter targets '{module}', which this model does not have")
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ModelError(f"{path}: adapter targets '{module}' ({type(base).__name__}); only linear layers are supported")
        a, b = parts["A"], parts["B"]
        r = a.shape[0]
        layer_cls = DoRALinear if (use_dora or "m" in parts) else LoRALinear
        layer = layer_cls.from_base(base, r=r, dropout=drop, scale=parts["scale"])
        if a.shape[1] != layer.lora_a.shape[0] or b.shape != (layer.lora_b.shape[1], r):
            raise ModelError(f"{path}: adapter shapes for '{module}' (A {a.shape}, B {b.shape}) do not fit this model")
        layer.lora_a = mx.array(np.ascontiguousarray(a.T))
        layer.lora_b = mx.array(np.ascontiguousarray(b.T))
        if "m" in parts:
            layer.m = mx.array(parts["m"])
        set_module(model, module, layer)
    return cfg


def switch_adapter(model, path: Path | None, cache: dict) -> None:
    """Put the adapter at `path` (None: none) on an inference model in place of the current one.
    The LoRA/DoRA layers of each adapter are built once and kept in `cache`; they all wrap the
    same base layers, so switching moves module references and copies no weights."""
    for module, layer in lora_modules(model).items():
        set_module(model, module, layer.linear)
    if path is None:
        return
    key = str(Path(path).resolve())
    if key not in cache:
        apply_peft(model, Path(path), dropout=0.0)
        model.freeze()
        cache[key] = lora_modules(model)
        return
    for module, layer in cache[key].items():
        set_module(model, module, layer)
