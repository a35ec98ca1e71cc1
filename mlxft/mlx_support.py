"""What the MLX backend can train, decided from a config.json without importing mlx: the model
types whose mlx-lm classes share transformers' module names, and the MLX quantizations it reads.
`mlxft models`, `--backend auto` and the MLX backend's own load all ask here.

mlx-lm's own model-type aliases (mlx_lm.utils.MODEL_REMAPPING) are imported from mlx-lm, not
copied; importing mlx_lm.utils loads mlx (a few seconds of CPU, once per process), so it is read
only when mlx-lm is installed and a model is checked.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from mlxft.mlx_lm_config import UnmappableRope, mlx_lm_fields

# Model types whose mlx-lm classes use the HF module names (PEFT keys map 1:1) and build their
# attention mask through the cache hook that packed batches use.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


@functools.lru_cache(maxsize=1)
def mlx_lm_models_dir() -> Path | None:
    """mlx-lm's models/ folder, found without running mlx_lm's __init__; None when not installed."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@functools.lru_cache(maxsize=1)
def model_remapping() -> dict[str, str]:
    """mlx-lm's MODEL_REMAPPING (model types it loads through another module); {} without mlx-lm."""
    if mlx_lm_models_dir() is None:
        return {}
    from mlx_lm.utils import MODEL_REMAPPING

    return dict(MODEL_REMAPPING)


def unsupported_reason(config: dict, remap: dict[str, str] | None = None) -> str | None:
    """Why the MLX backend cannot train the model of this config.json, or None when it can.
    `remap`: mlx-lm's model-type aliases (default: its MODEL_REMAPPING)."""
    remap = model_remapping() if remap is None else remap
    model_type = config.get("model_type", "?")
    if remap.get(model_type, model_type) not in SUPPORTED_TYPES:
        return (f"architecture '{model_type}' is not supported by the MLX backend "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); try --backend torch")
    try:
        mlx_lm_fields(config)
    except UnmappableRope as exc:
        return str(exc)
    quant = config.get("quantization")
    if isinstance(quant, dict):
        layers = [quant] + [v for v in quant.values() if isinstance(v, dict)]
        for q in layers:
            mode, bits = q.get("mode", quant.get("mode", "affine")), q.get("bits", quant.get("bits"))
            if mode != "affine" or bits not in SUPPORTED_BITS:
                return (f"MLX quantization mode '{mode}' with {bits} bits is not supported "
                        f"for training (affine {'/'.join(map(str, SUPPORTED_BITS))}-bit only)")
    elif isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unknown")
        return (f"quantization '{method}' is not supported by the MLX backend "
                "(use a dense model or an MLX affine-quantized one)")
    return None


def mlx_can_train(config: dict) -> bool:
    """mlx-lm is installed with a module for this model type and the MLX backend accepts it."""
    models = mlx_lm_models_dir()
    if models is None:
        return False
    remap = model_remapping()
    model_type = config.get("model_type") or ""
    model_type = remap.get(model_type, model_type).replace("-", "_")
    return bool(model_type and (models / f"{model_type}.py").is_file()) and unsupported_reason(config, remap) is None
