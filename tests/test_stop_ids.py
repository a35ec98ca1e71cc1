"""One stop rule (mlxft.templates.stop_ids): the caller's ids, the chat format's end-of-turn ids
and every EOS id of the tokenizer, config.json and generation_config.json; both backends ask it."""

from __future__ import annotations

import json
import shutil
import types

import pytest

from mlxft.templates import stop_ids


def test_stop_ids_unites_every_source(tmp_path):
    tok = types.SimpleNamespace(eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    setup = types.SimpleNamespace(stop_ids=[11])
    assert stop_ids(tok, tmp_path, setup, extra=[13]) == {2, 5, 7, 11, 13}
    assert stop_ids(tok) == {2}
    (tmp_path / "generation_config.json").write_text("not json")
    assert stop_ids(tok, tmp_path) == {2, 5}


def test_both_backends_stop_on_the_same_ids(tiny_model_dir, tmp_path):
    """The torch backend read EOS from the loaded model's generation config, the MLX backend from
    the files; now both read the files, so a generation_config.json EOS list stops both."""
    pytest.importorskip("torch")
    from mlxft.backends.select import make_backend, module_available
    from mlxft.config import Config

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 17]}))
    found = {}
    for name in ("torch", "mlx"):
        if name == "mlx" and not module_available("mlx_lm"):
            continue
        backend = make_backend(name, Config())
        backend.load(model, train=False)
        found[name] = backend.stop_ids([99])
    assert found["torch"] >= {2, 17, 99}
    if "mlx" in found:
        assert found["mlx"] == found["torch"]
