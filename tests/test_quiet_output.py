"""mlxft's stderr carries mlxft's own progress, not the raw tqdm bars of the libraries it calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.gguf import write_tiny_gguf


def test_gguf_import_shows_no_tqdm_bar(tmp_path):
    """transformers' GGUF loader draws 'Converting and de-quantizing GGUF tensors' with tqdm, one
    carriage-return frame per update; the CLI run that imports a GGUF must not pass it on."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLXFT_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "mlxft", "generate", str(gguf), "--prompt", "hi",
                           "--max-tokens", "2", "--backend", "torch"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "home" / "models").is_dir()  # the import did run in this process
    assert "GGUF tensors" not in done.stderr and "it/s]" not in done.stderr and "\r" not in done.stderr
