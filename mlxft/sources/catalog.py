"""The models on this machine that mlxft can use: Hub snapshots in the HF cache (found with
huggingface_hub's scan_cache_dir) and GGUF files imported into MLXFT_HOME/models. Works offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlxft.errors import ModelError


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_models() -> list[dict]:
    """One entry per cached revision / imported GGUF: repo, revision, refs, size, quantization,
    architecture, backends that can train it, path, and whether it is complete."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from mlxft.paths import imported_models_dir
    from mlxft.sources.capabilities import describe
    from mlxft.sources.hub import hub_cache_dir, snapshot_problem

    rows: list[dict] = []
    try:
        info = scan_cache_dir(hub_cache_dir())
        repos = [r for r in info.repos if r.repo_type == "model"]
    except CacheNotFound:
        repos = []
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            snapshot = Path(rev.snapshot_path)
            problem = snapshot_problem(snapshot)
            rows.append({"repo": repo.repo_id, "revision": rev.commit_hash, "refs": sorted(rev.refs),
                         "size_bytes": rev.size_on_disk, "source": "hub", "path": str(snapshot),
                         "complete": problem is None, "problem": problem, **describe(snapshot)})
    imported = imported_models_dir()
    if imported.is_dir():
        for folder in sorted(imported.iterdir()):
            meta_file = folder / "mlxft_source.json"
            if not (folder / "config.json").is_file() or not meta_file.is_file():
                continue
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                meta = {}
            rows.append({"repo": folder.name, "revision": (meta.get("sha256") or "")[:12] or None,
                         "refs": [], "size_bytes": _dir_size(folder),
                         "source": meta.get("kind", "gguf"), "origin": meta.get("gguf") or meta.get("source"),
                         "path": str(folder), "complete": True, "problem": None, **describe(folder)})
    return rows


def remove_model(spec: str) -> list[str]:
    """Remove a cached Hub repo (every revision), one revision (REPO@REV, a commit prefix or ref),
    or an imported model folder by name. Returns what was removed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from mlxft.paths import imported_models_dir
    from mlxft.sources.hub import hub_cache_dir

    name, _, revision = spec.partition("@")
    folder = imported_models_dir() / name
    if "/" not in name and (folder / "config.json").is_file():
        shutil.rmtree(folder)
        return [str(folder)]
    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        info = None
    repo = next((r for r in (info.repos if info else []) if r.repo_id == name and r.repo_type == "model"), None)
    if repo is None:
        raise ModelError(f"'{name}': not in the Hugging Face cache ({hub_cache_dir()}) "
                         "nor among imported models", "see `mlxft models`")
    revs = list(repo.revisions)
    if revision:
        revs = [r for r in revs if r.commit_hash.startswith(revision) or revision in r.refs]
        if not revs:
            raise ModelError(f"{name}: no cached revision '{revision}'", "see `mlxft models`")
    hashes = [r.commit_hash for r in revs]
    info.delete_revisions(*hashes).execute()
    # partial downloads (blobs/*.incomplete) of a repo that is gone entirely
    if len(revs) == len(repo.revisions) and Path(repo.repo_path).exists():
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    return [f"{name}@{h[:12]}" for h in hashes]
