"""Import a GGUF file (the kind Ollama and LM Studio keep) as an HF-format model folder.

Weights are dequantized to float32 and saved as safetensors beside the tokenizer and chat
template. Imports are cached under MLXFT_HOME/models/<name>-<hash> keyed by the file's hash, so
each GGUF is converted once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlxft.atomic import atomic_dir
from mlxft.errors import ModelError
from mlxft.paths import imported_models_dir

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mistral")


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file, cached beside the import by (size, mtime) so re-resolving is instant."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = imported_models_dir() / "digests.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(index)
    return digest


def read_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelError(f"{path}: GGUF has no general.architecture") from None
    except Exception as exc:  # gguf-py raises ValueError/IndexError/etc. on damaged files
        raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def import_gguf(path: Path, name: str | None = None) -> Path:
    """Return an HF-format folder for `path`, converting it on first use."""
    path = Path(path)
    digest = file_digest(path)
    target = imported_models_dir() / f"{name or path.stem}-{digest[:12]}"
    if (target / "config.json").is_file():
        return target
    arch = read_architecture(path)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: GGUF architecture '{arch}' is not supported",
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    from mlxft.ui import console

    with console.status(f"Importing {path.name} (once; cached in {target.parent})"):
        _convert_with_transformers(path, target, digest)
    return target


def _convert_with_transformers(path: Path, target: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelError(f"{path}: cannot import GGUF ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.stem
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "mlxft_source.json").write_text(json.dumps(
            {"gguf": str(path.resolve()), "sha256": digest}, indent=2))
