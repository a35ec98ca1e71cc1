"""`ollama:NAME[:TAG]` -> the GGUF blob of a model in the local Ollama store, so a model the user
already runs can be fine-tuned. Read-only: Ollama's files are never changed.

Store: $OLLAMA_MODELS, else ~/.ollama/models. A manifest is JSON at
manifests/<registry>/<namespace>/<name>/<tag> (default registry.ollama.ai, namespace library,
tag latest); its layer with mediaType application/vnd.ollama.image.model names the weights
blob by digest "sha256:<hex>", stored as blobs/sha256-<hex>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxft.errors import ModelError

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
ADAPTER_MEDIA_TYPE = "application/vnd.ollama.image.adapter"
DEFAULT_REGISTRY = "registry.ollama.ai"


def ollama_models_dir() -> Path:
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"]).expanduser()
    return Path.home() / ".ollama" / "models"


def parse_ollama_spec(spec: str) -> tuple[str, str, str, str]:
    """'ollama:[registry/][namespace/]name[:tag]' -> (registry, namespace, name, tag)."""
    ref = spec[len("ollama:"):] if spec.startswith("ollama:") else spec
    if not ref:
        raise ModelError(f"'{spec}': no model name after ollama:")
    path, _, tag = ref.partition(":")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in parts) or "/" in tag:
        raise ModelError(f"'{spec}': not an Ollama model name (expected ollama:NAME[:TAG])")
    registry = parts[0] if len(parts) == 3 else DEFAULT_REGISTRY
    namespace = parts[-2] if len(parts) >= 2 else "library"
    return registry, namespace, parts[-1], tag or "latest"


def resolve_ollama(spec: str) -> Path:
    """The GGUF weights blob for `spec`, checked to exist and to start with the GGUF magic."""
    registry, namespace, name, tag = parse_ollama_spec(spec)
    store = ollama_models_dir()
    manifest = store / "manifests" / registry / namespace / name / tag
    if not manifest.is_file():
        have = sorted(p.name for p in manifest.parent.iterdir()) if manifest.parent.is_dir() else []
        hint = f"tags here: {', '.join(have)}" if have else f"`ollama pull {name}:{tag}` first, or set OLLAMA_MODELS"
        raise ModelError(f"{spec}: not in the Ollama store ({manifest} not found)", hint)
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        model_layers = [layer for layer in layers if layer.get("mediaType") == MODEL_MEDIA_TYPE]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{manifest}: unreadable Ollama manifest ({type(exc).__name__})") from None
    if not model_layers:
        raise ModelError(f"{spec}: its manifest has no model weights layer ({MODEL_MEDIA_TYPE})")
    digest = str(model_layers[0].get("digest", ""))
    algo, _, hexdigest = digest.partition(":")
    if not hexdigest or not hexdigest.isalnum():
        raise ModelError(f"{manifest}: bad layer digest {digest!r}")
    blob = store / "blobs" / f"{algo}-{hexdigest}"
    if not blob.is_file():
        raise ModelError(f"{spec}: weights blob {blob} is missing", f"run `ollama pull {name}:{tag}` again")
    with open(blob, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{spec}: {blob} is not a GGUF file")
    if any(layer.get("mediaType") == ADAPTER_MEDIA_TYPE for layer in layers):
        from mlxft.ui import warn

        warn(f"{spec} carries a LoRA adapter layer; only its base weights are used")
    return blob


def ollama_gguf_name(spec: str) -> str:
    """A readable cache name for the import of `spec`, e.g. ollama-qwen3-0.6b."""
    _, namespace, name, tag = parse_ollama_spec(spec)
    prefix = "" if namespace == "library" else f"{namespace}-"
    return f"ollama-{prefix}{name}-{tag}".replace(":", "-")
