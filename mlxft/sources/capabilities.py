"""What a model folder is, read from its config.json: causal LM or not, quantization, and which
backend can train it (PyTorch through transformers, MLX through mlx-lm), without loading weights.

The torch check imports transformers' auto-mapping tables (a few seconds, no torch); the MLX
check asks the MLX backend's own rules (mlxft/mlx_support.py: its architectures, quantizations
and mlx-lm's model-type remapping).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mlxft.mlx_support import mlx_can_train


@functools.lru_cache(maxsize=1)
def _causal_tables() -> tuple[dict, set]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    except Exception:  # transformers missing or broken: nothing is known to be loadable by torch
        return {}, set()
    return dict(names), set(names.values())


def is_causal_lm(config: dict) -> bool:
    """True for decoder-only text generators (LlamaForCausalLM, Gemma3ForConditionalGeneration...),
    False for encoders and seq2seq models (BertForMaskedLM, T5ForConditionalGeneration...)."""
    archs = config.get("architectures") or []
    by_type, classes = _causal_tables()
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) or a in classes for a in archs)
    return config.get("model_type") in by_type


def torch_can_train(config: dict) -> bool:
    by_type, _ = _causal_tables()
    return config.get("model_type") in by_type


def backend_support(config: dict) -> dict[str, bool]:
    """{'torch': ..., 'mlx': ...}: whether each installed backend can load and train it."""
    causal = is_causal_lm(config)
    # torch-only quantization formats (bitsandbytes, GPTQ, AWQ...) cannot be loaded by mlx-lm
    foreign = isinstance(config.get("quantization_config"), dict) and "quantization" not in config
    return {"torch": causal and torch_can_train(config),
            "mlx": causal and not foreign and mlx_can_train(config)}


def quantization(config: dict) -> str:
    """'mlx-4bit (group 64)', 'bnb-4bit', 'gptq-4bit', ... or 'none'."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict):
        return "none"
    if "quantization" in config and "bits" in q:
        mode = q.get("mode", "affine")
        suffix = "" if mode == "affine" else f" {mode}"
        return f"mlx-{q['bits']}bit{suffix} (group {q.get('group_size', 64)})"
    method = q.get("quant_method") or "quantized"
    bits = q.get("bits") or (4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else None)
    return f"{method}-{bits}bit" if bits else str(method)


def read_config(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(folder: Path) -> dict:
    """architecture, model_type, quantization and backend support of an HF-format folder."""
    config = read_config(folder)
    archs = config.get("architectures") or []
    return {"architecture": archs[0] if archs else config.get("model_type", "unknown"),
            "model_type": config.get("model_type"),
            "quantization": quantization(config) if config else "unknown",
            "backends": backend_support(config) if config else {"torch": False, "mlx": False}}
