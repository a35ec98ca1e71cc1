"""`ollama:NAME[:TAG]` resolves through a local Ollama store (manifests + blobs) to its GGUF
blob and imports it; missing models, tags and blobs are one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mlxft.errors import ModelError
from tests.helpers.gguf import write_tiny_gguf


def make_store(root: Path, gguf: Path, name: str = "tiny", tag: str = "latest",
               namespace: str = "library") -> Path:
    """Lay out a model the way `ollama pull` does: a manifest naming a blob by sha256."""
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, blobs / f"sha256-{digest}")
    config = b'{"model_format":"gguf","model_family":"llama"}'
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / f"sha256-{config_digest}").write_bytes(config)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blobs / f"sha256-{digest}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("ollama-src") / "tiny.gguf", seed=3,
                           layer0_types={t: "Q8_0" for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                              "ffn_gate", "ffn_up", "ffn_down")})


def test_ollama_model_resolves_and_imports(tiny_gguf, tmp_path, monkeypatch):
    from mlxft.sources import resolve_model
    from mlxft.sources.ollama import resolve_ollama

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path / "mlxft-home"))  # no import cached by an earlier session
    home_store = Path.home() / ".ollama" / "models"  # the default location (HOME is isolated)
    blob = make_store(home_store, tiny_gguf, name="tiny", tag="1b")
    assert resolve_ollama("ollama:tiny:1b") == blob
    resolved = resolve_model("ollama:tiny:1b")
    assert resolved.source == "ollama" and (resolved.path / "config.json").is_file()
    assert json.loads((resolved.path / "mlxft_source.json").read_text())["gguf"] == str(blob.resolve())
    # OLLAMA_MODELS overrides the location; tag defaults to latest; namespaced names work
    store = tmp_path / "elsewhere"
    make_store(store, tiny_gguf, name="tiny")
    make_store(store, tiny_gguf, name="mine", namespace="someone")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert resolve_ollama("ollama:tiny").parent == store / "blobs"
    assert resolve_ollama("ollama:someone/mine:latest").parent == store / "blobs"
    assert resolve_model("ollama:tiny").path == resolved.path  # same bytes: the cached import


def test_ollama_errors_are_one_line(tiny_gguf, tmp_path, monkeypatch):
    from mlxft.sources.ollama import resolve_ollama

    store = tmp_path / "store"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(ModelError, match="ollama:nothing: not in the Ollama store .*ollama pull nothing:latest"):
        resolve_ollama("ollama:nothing")
    blob = make_store(store, tiny_gguf, name="tiny", tag="1b")
    with pytest.raises(ModelError, match="ollama:tiny:7b: not in the Ollama store .*tags here: 1b"):
        resolve_ollama("ollama:tiny:7b")
    blob.unlink()
    with pytest.raises(ModelError, match="weights blob .* is missing"):
        resolve_ollama("ollama:tiny:1b")
    blob.write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_ollama("ollama:tiny:1b")
    for bad in ("ollama:", "ollama:../../etc:x", "ollama:a/b/c/d"):
        with pytest.raises(ModelError, match="ollama"):
            resolve_ollama(bad)
