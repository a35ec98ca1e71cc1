"""The adapter file, PEFT layout (adapter_config.json + adapter_model.safetensors), read and
written by both backends so an adapter trained by either loads in the other and in PEFT."""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.atomic import atomic_dir
from mlxft.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


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
