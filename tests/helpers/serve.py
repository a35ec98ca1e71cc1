"""Serving in tests: two tiny runs with different adapters, `mlxft serve` as a real process on a
loopback port, a server in a thread of the test process, and `mlxft generate` for the texts a
server must equal (tests/test_serve.py, tests/test_serve_batching.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.data import collate
from tests.helpers.mlx import config, samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two runs of the tiny base with different adapters (LoRA and DoRA), trained a few steps."""
    from mlxft.backends.mlx_backend import MLXBackend
    from mlxft.runs import create_run

    work = tmp_path_factory.mktemp("serve-runs")
    out = []
    for name, kind, seed in (("alpha", "lora", 1), ("beta", "dora", 2)):
        cfg = config(kind)
        cfg.seed = seed
        be = MLXBackend(cfg)
        be.load(Path(tiny_model_dir), train=True)
        batch = collate(samples(seed=seed), 2)
        for _ in range(4):
            assert be.train_step([batch], 5e-2).finite
        run = create_run(work / name, model=str(tiny_model_dir), model_path=str(tiny_model_dir), source="local")
        be.save_adapter(run.last_adapter)
        out.append(run.path)
    return out


def _generate(run, prompt, n, backend="mlx", raw=False):
    from mlxft.cli import cli

    args = ["generate", str(run), "-p", prompt, "-n", str(n), "-t", "0", "--backend", backend, "--json"]
    result = CliRunner().invoke(cli, args + (["--raw"] if raw else []), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


@contextlib.contextmanager
def server_process(run_dirs, *options, backend="mlx"):
    """`mlxft serve RUN...` as a real process on a loopback port; yields its base URL."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "mlxft", "serve", *map(str, run_dirs), "--port", str(port),
                             "--backend", backend, *options], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("server did not start: " + proc.stderr.read()[-2000:])
        time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class _InProcess:
    """A server in a thread of the test process, so a test can see its engine."""

    def __init__(self, engine, api_key=None):
        from mlxft.serve.app import create_app

        self.engine, self.port = engine, _free_port()
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
