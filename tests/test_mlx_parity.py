"""MLX backend vs PyTorch backend on tiny random models of every family the MLX backend trains,
built with transformers-5 configs whose RoPE settings are NOT mlx-lm's defaults (so a setting
lost between the libraries shows): next-token logits on the same ids within 1e-3 of the logit
range (mlxft.parity explains the bound); the same comparison with the config translation
switched off fails it; folders mlxft writes still read the same in transformers and, where the
translation is representable in a shared file, in plain mlx-lm; unmappable RoPE is refused in
one line before loading.

The models use initializer_range 0.2 (not 0.02) so that attention is peaked enough for RoPE to
matter: with 0.02 a wrong base moved logits by only ~1.6e-3 of the range on these models."""

from __future__ import annotations

import json
import shutil

import pytest

from mlxft.errors import ModelError
from mlxft.parity import BOUND, check_model
from tests.tiny import ROPE_FAMILIES as FAMILIES
from tests.tiny import make_rope_family

pytestmark = pytest.mark.mlx
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("torch")

# mlx-lm 0.32's qwen3 reads transformers-5 rope_parameters itself; every other family here
# loses its RoPE settings without the translation.
RIGHT_WITHOUT_TRANSLATION = {"qwen3"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("families")
    return {name: make_rope_family(root, default_model_dir, name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_matches_torch(family_dirs, family):
    result = check_model(family_dirs[family], before=True)
    after, before = result["after"], result["before"]
    assert after.ok, f"{family}: max diff {after.max_diff:.3g} = {after.ratio:.3g} of the range (bound {BOUND})"
    assert after.same_argmax == 1.0
    # the injected bug: mlx-lm reading config.json as transformers 5 wrote it
    if family in RIGHT_WITHOUT_TRANSLATION:
        assert not isinstance(before, str) and before.ok
    else:
        assert isinstance(before, str) or not before.ok, f"{family}: the comparison cannot see a lost RoPE setting"


def _rope_view(folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    rope = json.loads(json.dumps(config.rope_parameters))
    for part in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
        if part.get("type") == part.get("rope_type"):
            part.pop("type", None)  # transformers' legacy alias of rope_type (mlx-lm's phi3 requires it)
    return rope, getattr(config, "layer_types", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_folder_reads_the_same_in_both(family_dirs, family, tmp_path):
    """What gguf import and fuse write: transformers reads the same RoPE back, and where every
    translated field is representable, plain mlx-lm (no mlxft) computes the torch logits."""
    from mlxft.mlx_lm_config import mlx_lm_fields, write_shared_config
    from mlxft.parity import compare, mlx_logits, probe_ids, torch_logits

    src = family_dirs[family]
    dst = shutil.copytree(src, tmp_path / family)
    write_shared_config(dst)
    assert _rope_view(dst) == _rope_view(src)
    fields = mlx_lm_fields(json.loads((src / "config.json").read_text()))
    if fields.shared_safe != fields.overrides:
        assert family in ("llama-yarn", "phi3-longrope")  # yarn's filled-in defaults; longrope's stand-in
        return
    from transformers import AutoTokenizer

    ids = probe_ids(AutoTokenizer.from_pretrained(str(src)))
    assert compare(torch_logits(src, ids), mlx_logits(dst, ids, translate=False)).ok


def _variant(src, tmp_path, edit):
    dst = shutil.copytree(src, tmp_path / "variant")
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("family, edit, words", [
    ("llama", lambda c: c["rope_parameters"].update(rope_type="proportional"), ["'proportional'", "'llama'"]),
    ("llama", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5), ["partial_rotary_factor"]),
    ("llama-yarn", lambda c: c["rope_parameters"].update(truncate=False), ["'yarn'", "truncate"]),
    ("gemma3_text", lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0),
     ["'linear'", "'gemma3_text'", "sliding"]),
    ("phi3", lambda c: c["rope_parameters"].update(rope_type="dynamic", factor=2.0), ["'dynamic'", "'phi3'"]),
    ("gemma3_text", lambda c: c.update(layer_types=["sliding_attention"] * 2), ["layer_types", "'gemma3_text'"]),
])
def test_unmappable_rope_is_refused_in_one_line(family_dirs, tmp_path, family, edit, words):
    from mlxft.backends.mlx_backend import MLXBackend
    from tests.helpers.mlx import config

    be = MLXBackend(config())
    with pytest.raises(ModelError) as exc:
        be.load(_variant(family_dirs[family], tmp_path, edit))
    msg = exc.value.message
    assert "\n" not in msg and "--backend torch" in msg and all(w in msg for w in words), msg
    assert be.model is None


def test_longrope_training_past_the_short_factors_is_refused(family_dirs):
    """mlx-lm applies one factor set at every length; past original_max_position_embeddings
    transformers switches to the long factors, so training there would not be the same model."""
    from mlxft.backends.mlx_backend import MLXBackend
    from tests.helpers.mlx import config

    with pytest.raises(ModelError) as exc:
        MLXBackend(config(max_seq_len=256)).load(family_dirs["phi3-longrope"])
    assert "128" in exc.value.message and "max_seq_len" in exc.value.message
    MLXBackend(config(max_seq_len=128)).load(family_dirs["phi3-longrope"])  # within: loads


def test_doctor_check_compares_the_backends(family_dirs, monkeypatch):
    from click.testing import CliRunner

    from mlxft.cli import cli

    res = CliRunner().invoke(cli, ["doctor", "--check", str(family_dirs["llama-llama3"]), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["ratio"] <= BOUND and report["tokens"] == 32
    assert report["mlx_lm_fields"]["rope_scaling"]["rope_type"] == "llama3"

    import mlxft.backends.mlx_backend as mb
    from mlxft.mlx_lm_config import MlxLmFields

    monkeypatch.setattr(mb, "mlx_lm_fields", lambda config: MlxLmFields({}, {}))  # the bug, injected
    res = CliRunner().invoke(cli, ["doctor", "--check", str(family_dirs["llama-llama3"])])
    assert res.exit_code == 1 and "DIFFERENT MODELS" in res.stdout
    assert "differ from PyTorch's" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_train_refuses_unmappable_rope_before_training(family_dirs, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli
    from tests.helpers.mlx import write_chat

    model = _variant(family_dirs["llama"], tmp_path, lambda c: c["rope_parameters"].update(rope_type="proportional"))
    data = write_chat(tmp_path / "chat.jsonl")
    res = CliRunner().invoke(cli, ["train", "--model", str(model), "--data", str(data), "--backend", "mlx",
                                   "--steps", "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'proportional'" in lines[0] and "'llama'" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
