"""Where mlxft keeps its own files: MLXFT_HOME, else $XDG_CACHE_HOME/mlxft, else ~/.cache/mlxft."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if os.environ.get("MLXFT_HOME"):
        return Path(os.environ["MLXFT_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlxft"


def imported_models_dir() -> Path:
    """HF-format folders made from GGUF files, keyed by file hash."""
    return home() / "models"
