"""`--seed` for generate and chat: sampled answers (temperature > 0) repeat for one seed and
differ between seeds, on each backend."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxft.cli import cli


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_dir):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("seed") / "tiny", default_model_dir, tie_word_embeddings=False)


def generated(model, seed: int, backend: str) -> str:
    res = CliRunner().invoke(cli, ["generate", str(model), "-p", "hello", "-n", "12", "-t", "1.0",
                                   "--seed", str(seed), "--backend", backend, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["text"]


def chatted(model, seed: int) -> str:
    res = CliRunner().invoke(cli, ["chat", str(model), "-n", "12", "-t", "1.0", "--seed", str(seed),
                                   "--backend", "torch"], input="hello\n")
    assert res.exit_code == 0, res.output
    return res.stdout


def test_generate_seed_repeats_and_differs(model):
    first = generated(model, 1, "torch")
    assert first and generated(model, 1, "torch") == first
    assert generated(model, 2, "torch") != first


def test_chat_seed_repeats_and_differs(model):
    first = chatted(model, 1)
    assert first.strip() and chatted(model, 1) == first
    assert chatted(model, 2) != first


@pytest.mark.mlx
def test_generate_seed_on_mlx(model):
    pytest.importorskip("mlx_lm")
    first = generated(model, 1, "mlx")
    assert first and generated(model, 1, "mlx") == first
    assert generated(model, 2, "mlx") != first
