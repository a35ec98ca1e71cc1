"""Before a distributed run takes a step, every rank must hold the same model, data and recipe.

Each rank fingerprints what it loaded; the fingerprints are gathered and compared with rank 0's.
A mismatch stops every rank with one line naming the rank and what differs, instead of a run
that averages gradients of different models or data and silently learns nothing useful.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from mlxft.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz")
# What each fingerprint part is called in the error, in the order they are compared.
PARTS = {"mlxft": "mlxft version", "backend": "training backend", "model": "base model (config and weight files)",
         "adapter": "starting adapter", "data": "tokenized training and validation data",
         "config": "recipe (config hash, paths aside)"}


def _sha(payload) -> str:
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def model_identity(path: Path) -> list:
    """config.json and the names and sizes of the weight files: cheap, and different for any
    other model or quantization (hashing gigabytes of weights per rank would not be)."""
    path = Path(path)
    if path.is_file():
        return [path.name, path.stat().st_size]
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    config = path / "config.json"
    return [config.read_text(encoding="utf-8") if config.is_file() else None,
            [(p.name, p.stat().st_size) for p in files]]


def data_identity(*datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        for s in ds.samples:
            for part in (s.chosen, s.rejected) if hasattr(s, "chosen") else (s,):  # preference pairs: both
                h.update(json.dumps([part.ids, part.targets]).encode())
        h.update(b"|")
    return h.hexdigest()


def config_identity(cfg) -> str:
    """The recipe with model and data paths blanked: those are compared by content, and hosts
    may keep the same files under different paths."""
    d = dataclasses.asdict(cfg)
    d["model"] = None
    d["data"]["train"] = d["data"]["valid"] = None
    return _sha(d)


def fingerprint(cfg, model_path: Path, adapter: Path | None, backend: str, train, valid) -> dict[str, str]:
    from mlxft import __version__

    adapter_id = None
    if adapter is not None and Path(adapter).is_dir():
        adapter_id = [(p.name, p.stat().st_size) for p in sorted(Path(adapter).iterdir()) if p.is_file()]
    return {"mlxft": __version__, "backend": backend, "model": _sha(model_identity(model_path)),
            "adapter": _sha(adapter_id), "data": data_identity(train, valid), "config": config_identity(cfg)}


def check_agreement(world, mine: dict[str, str]) -> None:
    """Raise ConfigError on every rank when any rank's fingerprint differs from rank 0's."""
    if not world.distributed:
        return
    everyone = [json.loads(b) for b in world.all_gather_bytes(json.dumps(mine).encode())]
    root = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key, what in PARTS.items():
            if theirs.get(key) != root.get(key):
                raise ConfigError(
                    f"rank {rank} disagrees with rank 0 on the {what}: {str(theirs.get(key))[:12]} vs "
                    f"{str(root.get(key))[:12]}; no step was run",
                    "start every rank with the same mlxft version, model, data and recipe")
