"""The adapter model: the PEFT layout (adapter_config.json + adapter_model.safetensors) read and
written here for both backends, fuse, export and serve, so an adapter trained by either backend
loads in the other and in PEFT, and every reader gives each module the same rank and scale.

Tensor keys are `base_model.model.<module path>.<kind>`, kinds:
    lora_A.weight (r, in), lora_B.weight (out, r)          linear LoRA (optionally `.<adapter name>`)
    lora_embedding_A (r, vocab), lora_embedding_B (dim, r)  embedding LoRA
    lora_magnitude_vector (out,)                           DoRA
anything else is a full tensor saved by `modules_to_save`. Scale per module: alpha / r
(alpha / sqrt(r) with rsLoRA), r and alpha taken from `rank_pattern` / `alpha_pattern` as PEFT
matches them (see pattern_key).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from mlxft.atomic import atomic_dir
from mlxft.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_FACTOR = re.compile(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$")
_EMBEDDING_FACTOR = re.compile(r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")
_MAGNITUDE = re.compile(r"(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$")


def pattern_key(pattern_keys, module: str) -> str | None:
    """The key of a `rank_pattern` / `alpha_pattern` that applies to `module`, as PEFT decides it
    (peft.utils.other.get_pattern_key): the first key, in the pattern's order, that is a regular
    expression matching the whole module path or a dotted suffix of it; None when none does."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha) of one module path (without the `base_model.model.` prefix) as PEFT builds it."""
    r = config.get("r", 8)
    rank_pattern = config.get("rank_pattern") or {}
    key = pattern_key(rank_pattern, module)
    if key is not None:
        r = rank_pattern[key]
    alpha_pattern = config.get("alpha_pattern") or {}
    key = pattern_key(alpha_pattern, module)
    alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", r)
    return int(r), float(alpha)


def module_scale(config: dict, module: str, rank: int | None = None) -> float:
    """PEFT's `scaling` of one module: alpha / r, or alpha / sqrt(r) with rsLoRA. `rank` (read
    from the module's lora_A) overrides the config's r when given."""
    r, alpha = module_rank_alpha(config, module)
    r = rank or r
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def parse_keys(keys, folder: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({module path: {kind: tensor key}}, {replaced tensor name: tensor key}) from the tensor
    keys of a PEFT adapter. Kinds: lora_A, lora_B, lora_embedding_A, lora_embedding_B,
    lora_magnitude_vector; replaced tensors are full weights saved by modules_to_save."""
    modules: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _FACTOR.match(name) or _EMBEDDING_FACTOR.match(name) or _MAGNITUDE.match(name)
        if match:
            modules.setdefault(match.group(1), {})[match.group(2)] = key
        elif ".modules_to_save." in name:
            replaced[re.sub(r"\.modules_to_save\.[^.]+", "", name)] = key
        else:
            replaced[name] = key
    for module, parts in modules.items():
        if not ({"lora_A", "lora_B"} <= set(parts) or {"lora_embedding_A", "lora_embedding_B"} <= set(parts)):
            raise ModelError(f"{folder}: incomplete LoRA factors for {module}")
    return modules, replaced


def linear_factors(folder: Path, what: str = "this use") -> tuple[dict, dict]:
    """(adapter config, {module path: {"A" (r, in), "B" (out, r)[, "m" (out,)], "scale"}}) as
    float32 arrays, for readers that handle linear LoRA/DoRA only (the MLX backend, the mlx-lm
    layout); anything else fails in one line naming `what`."""
    import numpy as np

    folder = Path(folder)
    config = read_adapter_config(folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{folder}: adapter type {config.get('peft_type')} is not supported by {what} (only LoRA/DoRA)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ModelError(f"{folder}: adapters with trained biases or modules_to_save are not supported by {what}")
    if config.get("fan_in_fan_out"):
        raise ModelError(f"{folder}: fan_in_fan_out adapters are not supported by {what}")
    tensors = read_adapter_tensors(folder)
    modules, replaced = parse_keys(tensors, folder)
    for name in replaced:
        raise ModelError(f"{folder}: adapter tensor '{replaced[name]}' is not a LoRA/DoRA weight (not supported)")
    groups = {}
    for module, parts in modules.items():
        if "lora_A" not in parts:
            raise ModelError(f"{folder}: '{module}' is an embedding LoRA, which {what} does not support")
        a = tensors[parts["lora_A"]].astype(np.float32)
        b = tensors[parts["lora_B"]].astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"{folder}: '{module}' is not a linear LoRA (A {a.shape}, B {b.shape})")
        group = {"A": a, "B": b, "scale": module_scale(config, module, a.shape[0])}
        if "lora_magnitude_vector" in parts:
            group["m"] = tensors[parts["lora_magnitude_vector"]].astype(np.float32).reshape(-1)
        groups[module] = group
    if not groups:
        raise ModelError(f"{folder}: adapter holds no LoRA weights")
    return config, groups


def write_peft_adapter_dir(peft_model, path: Path) -> None:
    """Save a PEFT model's adapter atomically (the previous adapter survives a failed write)."""
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)


def read_adapter_config(path: Path) -> dict:
    cfg_path = Path(path) / CONFIG
    try:
        return json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no {CONFIG}; not a PEFT adapter folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable ({exc})") from None


def read_adapter_tensors(path: Path) -> dict:
    """Adapter weights as numpy arrays, keyed by PEFT names."""
    from safetensors.numpy import load_file

    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise ModelError(f"{path}: no {WEIGHTS}")
    try:
        return load_file(str(file))
    except Exception as exc:
        raise ModelError(f"{file}: unreadable safetensors ({exc})") from None


def write_adapter(path: Path, config: dict, tensors: dict) -> None:
    """Write a PEFT-layout adapter from a config dict and numpy tensors (used by the MLX backend)."""
    from safetensors.numpy import save_file

    with atomic_dir(path) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})


class Adapter:
    """A PEFT adapter folder read lazily (one tensor at a time, as float32): per base-module LoRA
    factors and scaling, the DoRA magnitude, and whole tensors saved by modules_to_save. Used by
    fuse and by the GGUF adapter export."""

    def __init__(self, folder: Path):
        from mlxft.safetensors_io import SafetensorsFolder

        self.folder = Path(folder)
        self.config = read_adapter_config(self.folder)
        self.use_dora = bool(self.config.get("use_dora"))
        if self.config.get("fan_in_fan_out"):
            raise ModelError(f"{self.folder}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        file = self.folder / WEIGHTS
        if not file.is_file():
            raise ModelError(f"{self.folder}: no {WEIGHTS}")
        self.st = SafetensorsFolder(self.folder, [file])
        self.modules, self.replaced = parse_keys(self.st.names(), self.folder)

    def rank(self, module: str) -> int:
        parts = self.modules[module]
        a = parts.get("lora_A") or parts["lora_embedding_A"]
        return self.st.shape(a)[0]

    def scale(self, module: str) -> float:
        """alpha / r (PEFT rank_pattern / alpha_pattern honoured; rsLoRA: alpha / sqrt(r))."""
        return module_scale(self.config, module, self.rank(module))

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, in), B (out, r)) as float32, for any LoRA kind (embeddings transposed)."""
        parts = self.modules[module]
        if "lora_A" in parts:
            return self.st.f32(parts["lora_A"]), self.st.f32(parts["lora_B"])
        # embedding: delta (vocab, dim) = (B_e @ A_e).T with A_e (r, vocab), B_e (dim, r)
        return self.st.f32(parts["lora_embedding_B"]).T.copy(), self.st.f32(parts["lora_embedding_A"]).T.copy()

    def delta(self, module: str) -> np.ndarray:
        a, b = self.factors(module)
        return (b @ a) * np.float32(self.scale(module))


def _plain_number(value: float):
    """alpha as PEFT users write it: 16, not 16.000000000000004 (a float32 scale times r)."""
    return int(round(value)) if abs(value - round(value)) < 1e-6 * max(1.0, abs(value)) else value


def peft_config(base_model: str | None, ranks: dict[str, int], alphas: dict[str, float], *,
                dropout: float = 0.0, use_dora: bool = False, n_layers: int | None = None) -> dict:
    """The adapter_config.json of a LoRA/DoRA adapter with rank `ranks[module]` and alpha
    `alphas[module]` per adapted module path: the most common rank and alpha as r / lora_alpha,
    the others as rank_pattern / alpha_pattern keyed by the full module path (which PEFT's
    pattern matching takes for that module alone). `layers_to_transform` lists the adapted
    blocks when they are not all `n_layers` of them."""
    from collections import Counter

    alphas = {m: _plain_number(float(a)) for m, a in alphas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    layers = {int(match.group(1)) for m in ranks if (match := re.search(r"\.layers\.(\d+)\.", f".{m}"))}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "layers_to_transform": sorted(layers) if layers and (n_layers is None or len(layers) < n_layers) else None,
        "use_dora": use_dora, "use_rslora": False, "fan_in_fan_out": False,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
