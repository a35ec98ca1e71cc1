"""The forgetting guard on a base model (no chat template of its own): it is on by default, scores
how the base continues general passages, replays the base's own continuations of other passages
as text samples, and its floor decides which adapter is kept."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import write_jsonl
from tests.helpers.retention import script_validation


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, default_model_dir):
    """A tiny random llama whose tokenizer has no chat template: a base model."""
    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("base") / "tiny-base", default_model_dir, seed=1,
                           tie_word_embeddings=False)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (path / extra).unlink(missing_ok=True)
    return path


@pytest.fixture
def chats(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} means blue {i}."}]} for i in range(32)]
    return write_jsonl(tmp_path / "chats.jsonl", rows)


def _cfg(model, data, *sets):
    from mlxft.config import build_config

    return build_config(None, ["train.dtype=float32", "retention.probes=6", "retention.max_new_tokens=8", *sets],
                        {"model": str(model), "backend": "torch", "data": {"train": str(data), "valid": str(data)}})


def test_guard_is_on_by_default_for_a_base_model(base_model, chats, tmp_path, capsys):
    from mlxft.pipeline import train_run
    from mlxft.replay import REPLAY_FILE
    from mlxft.retention import PASSAGES, load_probes
    from mlxft.text_replay import TEXT_REPLAY_PASSAGES

    cfg = _cfg(base_model, chats, "train.steps=2", "train.eval_every=2")
    assert cfg.retention.floor is None  # nothing set: the defaults decide
    assert (cfg.data.replay, cfg.data.replay_distill) == (0.2, 16)
    summary = train_run(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert summary["verdict"]["floor"] == 0.9
    defaults = next(line for line in err.splitlines() if line.startswith("defaults:"))
    assert "keep retention >= 0.9 on text continuations" in defaults
    assert "replay 0.2 of its own text continuations towards its top-16 distribution" in defaults
    baseline = json.loads((tmp_path / "run" / "retention_baseline.json").read_text())
    passages = {p["id"] for p in load_probes(PASSAGES)}
    assert baseline["probes"] and all(p["id"] in passages and p["kind"] == "text" for p in baseline["probes"])
    replay = [json.loads(line) for line in (tmp_path / "run" / REPLAY_FILE).read_text().splitlines()]
    replay_ids = {p["id"] for p in load_probes(TEXT_REPLAY_PASSAGES)}
    # the 32 chats make 8 replay samples at share 0.2; a continuation with no full sentence is dropped
    assert 0 < len(replay) <= 8 and all(r["id"] in replay_ids and r["completion_ids"] for r in replay)
    assert not replay_ids & passages
    assert summary["retention"]["score"] is not None
    guard = summary["guard"]  # the time: line's share; replay samples are part of the training tokens
    assert 0 < guard["replay_token_share"] < 1 and 0 < guard["share"] < 1
    assert guard["seconds"] == pytest.approx(sum(guard["parts"].values()), abs=0.05)  # rounded parts


def test_text_replay_samples_are_the_base_models_own_tokens(base_model, chats, tmp_path):
    """A replay sample is the passage's ids then exactly the ids the base generated (cut at a
    sentence end), and only the continuation is trained."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.runs import create_run
    from mlxft.templates import for_training
    from mlxft.text_replay import continuation_records, text_sample

    cfg = _cfg(base_model, chats)
    backend = TorchBackend(cfg)
    backend.load(base_model, train=False)
    backend.chat_setup = for_training(backend.tokenizer, None)
    run = create_run(tmp_path / "run", model=str(base_model), model_path=str(base_model))
    records = continuation_records(cfg, run, backend, 40)
    assert records  # a random model ends few of its 40 continuations with a sentence: those are kept
    for rec in records:
        generated = backend.generate(rec["prompt_ids"], 48)
        assert generated[:len(rec["completion_ids"])] == rec["completion_ids"]
        assert rec["completion"].rstrip().endswith((".", "!", "?"))
        sample = text_sample(rec, 512)
        assert sample.ids == rec["prompt_ids"] + rec["completion_ids"]
        assert sample.targets == [False] * len(rec["prompt_ids"]) + [True] * len(rec["completion_ids"])


@pytest.mark.parametrize("sets, chosen", [((), 2), (("retention.floor=0",), 4)])
def test_base_models_floor_changes_the_chosen_adapter(base_model, chats, tmp_path, monkeypatch, sets, chosen):
    """Validation keeps improving while retention falls: on a base model the default floor (0.9)
    keeps the adapter of step 2, the last at or above it; without a floor step 4 is kept."""
    script_validation(monkeypatch, [6.0, 5.0, 4.0, 3.0, 2.0], [0.99, 0.95, 0.85, 0.80])
    from mlxft.pipeline import train_run

    summary = train_run(_cfg(base_model, chats, "train.steps=4", "train.eval_every=1", "data.replay=0", *sets),
                        tmp_path / "run")
    assert summary["chosen_step"] == chosen
    assert summary["verdict"]["floor"] == (0.9 if not sets else 0.0)
