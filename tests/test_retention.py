"""Retention check and replay: the score falls when a tiny model is trained hard on unrelated
data and stays near 1.0 with a tiny learning rate; the baseline is cached per base model;
replay mixes the base model's own answers in at the requested share."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import write_jsonl

FEW = ["retention.probes=6", "retention.max_new_tokens=8", "train.dtype=float32", "data.replay=0"]


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, default_model_dir):
    """Tiny model with an untied head: its greedy answers are varied tokens, not all newlines."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ret") / "tiny", default_model_dir, seed=1,
                           tie_word_embeddings=False)


@pytest.fixture
def unrelated(tmp_path):
    """Nothing like the probes: one nonsense chant repeated."""
    rec = {"messages": [{"role": "user", "content": "zork"}, {"role": "assistant", "content": "plugh xyzzy " * 6}]}
    return write_jsonl(tmp_path / "unrelated.jsonl", [rec] * 16)


def train(model, out, data, *sets):
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    cfg = build_config(None, [*FEW, *sets], {"model": str(model), "backend": "torch",
                                            "data": {"train": str(data), "valid": str(data)}})
    return train_run(cfg, out)


def count_generate(monkeypatch) -> list:
    from mlxft.backends.torch_backend import TorchBackend

    calls = []
    real = TorchBackend.generate_batch

    def counted(self, prompts, *a, **kw):
        calls.extend([1] * len(prompts))  # one per prompt the base model answered
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(TorchBackend, "generate_batch", counted)
    return calls


def test_retention_falls_when_trained_hard(varied_model, unrelated, tmp_path, capsys):
    summary = train(varied_model, tmp_path / "hard", unrelated, "train.steps=30", "train.learning_rate=5e-2",
                    "lora.rank=16", "train.eval_every=30")
    ret = summary["retention"]
    assert ret["probes"] == 6 and ret["base_agreement"] > 0.9
    assert ret["score"] < 0.7, ret  # ~0.5 measured; ~1.0 untrained
    assert ret["agreement"] < ret["base_agreement"]
    assert "warning" in ret and "data.replay" in ret["warning"] and "learning_rate" in ret["warning"]
    assert "below retention.warn_below" in capsys.readouterr().err
    meta = json.loads((tmp_path / "hard" / "run.json").read_text())
    assert meta["results"]["retention"]["score"] == pytest.approx(ret["score"])
    baseline = json.loads((tmp_path / "hard" / "retention_baseline.json").read_text())
    assert len(baseline["probes"]) == 6 and all(p["answer_ids"] for p in baseline["probes"])


def test_retention_near_one_with_tiny_lr_and_baseline_cached(varied_model, unrelated, tmp_path, monkeypatch):
    from mlxft.paths import home

    calls = count_generate(monkeypatch)
    first = train(varied_model, tmp_path / "a", unrelated, "train.steps=3", "train.learning_rate=1e-7",
                  "retention.probes=5")
    ret = first["retention"]
    # the base answered each probe once; the chosen adapter only those whose base answer it no
    # longer predicts top-1 throughout (at this learning rate: none or nearly none)
    assert len(calls) == 5 + len(ret["diverged_ids"]) and len(ret["diverged_ids"]) <= 1
    assert ret["score"] > 0.999 and ret["agreement"] > 0.95 and abs(ret["nats_per_token"]) < 1e-3
    assert "warning" not in ret
    calls.clear()
    second = train(varied_model, tmp_path / "b", unrelated, "train.steps=3", "train.learning_rate=1e-7",
                   "retention.probes=5")
    # the baseline is cached under MLXFT_HOME/retention; only the adapter answered
    assert len(calls) == len(second["retention"]["diverged_ids"])
    assert second["retention"]["score"] == pytest.approx(ret["score"])
    a = json.loads((tmp_path / "a" / "retention_baseline.json").read_text())
    b = json.loads((tmp_path / "b" / "retention_baseline.json").read_text())
    assert a["probes"] == b["probes"]
    assert any(p.name.startswith("baseline-") for p in (home() / "retention").iterdir())


def test_baseline_is_recorded_again_when_the_weights_are_rewritten(varied_model, unrelated, tmp_path,
                                                                    monkeypatch):
    """The cache is keyed by the weight files' state too: the same folder with new weights (a
    re-pull, a fuse written over it) must not reuse the old model's answers."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(varied_model, tmp_path / "model")
    calls = count_generate(monkeypatch)
    train(model, tmp_path / "a", unrelated, "train.steps=1", "retention.probes=5")
    calls.clear()
    second = train(model, tmp_path / "b", unrelated, "train.steps=1", "retention.probes=5")
    # cached: only the chosen adapter answered, the probes it no longer predicts top-1 throughout
    assert len(calls) == len(second["retention"]["diverged_ids"])
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    calls.clear()
    third = train(model, tmp_path / "c", unrelated, "train.steps=1", "retention.probes=5")
    assert len(calls) == 5 + len(third["retention"]["diverged_ids"])  # the rewritten model answered again


def test_retention_is_the_kept_adapters(varied_model, unrelated, tmp_path):
    """The retention reported is the one tracked for the adapter kept in RUN/adapter-best, and
    that adapter, loaded from disk on its own, scores the same."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.pipeline import train_run
    from mlxft.retention import score_run
    from mlxft.runs import Run

    # validate on the probes' kind of text so validation loss worsens as training drifts
    valid = write_jsonl(tmp_path / "valid.jsonl", [
        {"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris is the capital of France."}]}])
    cfg = build_config(None, [*FEW, "train.steps=12", "train.learning_rate=3e-2", "train.eval_every=2",
                              "retention.probes=3"],
                       {"model": str(varied_model), "backend": "torch",
                        "data": {"train": str(unrelated), "valid": str(valid)}})
    summary = train_run(cfg, tmp_path / "run")
    ret = summary["retention"]
    assert ret["adapter"] == f"step {summary['chosen_step']}"
    run = Run(tmp_path / "run")
    assert run.adapter().name == "adapter-best"
    fresh = TorchBackend(cfg)
    fresh.load(varied_model, adapter=run.adapter(), train=False)
    assert score_run(cfg, run, fresh)["score"] == pytest.approx(ret["score"], abs=1e-4)


def test_replay_count_and_samples(default_model_dir, tmp_path):
    from mlxft.config import Config
    from mlxft.replay import REPLAY_FILE, replay_count, replay_samples
    from mlxft.runs import create_run
    from mlxft.tokenizer import load_tokenizer

    assert replay_count(0.0, 100) == 0
    assert replay_count(0.2, 80) == 20  # 20 of 100 = 0.2
    assert replay_count(0.5, 10) == 10
    tok = load_tokenizer(default_model_dir)
    run = create_run(tmp_path / "run")
    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                         {"role": "assistant", "content": f"Answer {i}."}]} for i in range(3)]
    write_jsonl(run.path / REPLAY_FILE, recs)
    cfg = Config()
    cfg.data.replay = 0.25
    samples = replay_samples(cfg, run, tok, 30)
    assert len(samples) == 10  # recorded answers repeat to reach the share
    assert [s.source for s in samples[:4]] == ["replay:r0", "replay:r1", "replay:r2", "replay:r0"]
    picked = tok.decode([t for t, m in zip(samples[1].ids, samples[1].targets) if m])
    assert picked == "Answer 1.<|im_end|>"  # loss only on the base model's answer, as in training


def test_replay_records_trim_and_drop(default_model_dir, tmp_path):
    """Answers cut off by the token budget keep their last full sentence, or are dropped."""
    from mlxft.config import Config
    from mlxft.replay import REPLAY_MAX_TOKENS, replay_records
    from mlxft.runs import create_run
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    answers = [("Short and done.", True), ("Rain is water falling. It comes from clouds and", False),
               ("no sentence end at all", False)]

    class Stub:
        name = "stub"
        tokenizer = tok
        calls = 0

        def generate(self, prompt_ids, max_tokens, temperature=0.0, **kw):
            text, stopped = answers[Stub.calls]
            Stub.calls += 1
            ids = tok(text, add_special_tokens=False)["input_ids"]
            # a cut-off answer uses the whole budget (padded here with a special token that decodes to "")
            return ids if stopped else ids + [tok.pad_token_id] * (max_tokens - len(ids))

        def generate_batch(self, prompts, max_tokens, temperature=0.0, **kw):
            return [self.generate(p, max_tokens, temperature) for p in prompts]

        def dtype_name(self):
            return "float32"

        def device_name(self):
            return "cpu"

    run = create_run(tmp_path / "run", model_path=str(tmp_path))  # a fresh cache key
    records = replay_records(Config(), run, Stub(), 3)
    assert [r["messages"][1]["content"] for r in records] == ["Short and done.", "Rain is water falling."]
    assert Stub.calls == 3 and REPLAY_MAX_TOKENS > 20
    again = replay_records(Config(), run, Stub(), 3)  # answered from the cache: no more generation
    assert again == records and Stub.calls == 3


@pytest.mark.slow
def test_retention_and_replay_on_default_model(default_model_dir, tmp_path):
    """The real SmolLM2-135M on the quickstart data: its greedy probe answers are its own top-1
    choices under the teacher-forced scoring, a short run keeps a high score, and replay records
    real sentences from the base model."""
    from pathlib import Path

    from mlxft.config import RECIPES_DIR

    data = Path(RECIPES_DIR) / "data" / "quickstart"
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    cfg = build_config(None, ["retention.probes=4", "retention.max_new_tokens=12", "train.steps=4",
                              "data.replay=0.05", "train.eval_every=4"],
                       {"model": str(default_model_dir), "backend": "torch",
                        "data": {"train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl")}})
    summary = train_run(cfg, tmp_path / "run")
    ret = summary["retention"]
    assert ret["base_agreement"] > 0.9 and 0.5 < ret["score"] <= 1.0
    replay = [json.loads(x) for x in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    assert 1 <= len(replay) <= 4
    assert all(r["messages"][1]["content"].strip() for r in replay)
