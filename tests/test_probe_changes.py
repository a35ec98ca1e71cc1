"""Per-probe retention: the base model against itself in another dtype changes no probe; an
adapter trained to change one everyday answer is named in the verdict while the mean retention
stays above the floor."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import write_jsonl


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, default_model_dir):
    """Tiny model with an untied head: its greedy answers are varied tokens, not all newlines."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("chg") / "tiny", default_model_dir, seed=1,
                           tie_word_embeddings=False)


def _backend(model, dtype):
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config

    cfg = build_config(None, [f"train.dtype={dtype}", "retention.probes=40", "retention.max_new_tokens=16"])
    backend = TorchBackend(cfg)
    backend.load(model, train=False)
    return cfg, backend


def test_the_rule_needs_a_flip_and_a_likelihood_drop():
    from mlxft.probe_changes import CHANGE_NATS, is_changed

    base = {"agreement": 1.0, "tokens": 8, "logprob": -2.0}
    assert not is_changed(base, -2.0 - 10 * CHANGE_NATS, 8, 8)  # less likely but still every token top-1
    assert not is_changed(base, -2.0 - 0.5 * CHANGE_NATS, 8, 7)  # a flip that costs little: a near-tie
    assert is_changed(base, -2.0 - 1.5 * CHANGE_NATS, 8, 7)


def test_base_against_itself_in_bf16_changes_no_probe(varied_model):
    """The baseline is recorded in float32; the same weights rounded to bfloat16 score it. bf16
    keeps 8 mantissa bits (relative error up to 2^-9 per weight), which moves a logit of this
    model by a few hundredths: enough to reorder near-ties, far from the ln 4 nats a probe's whole
    answer must lose to count as changed."""
    from mlxft.retention import build_baseline, compare, score_answers

    cfg, f32 = _backend(varied_model, "float32")
    baseline = build_baseline(cfg, f32)
    _, bf16 = _backend(varied_model, "bfloat16")
    items = [(r["prompt_ids"], r["answer_ids"]) for r in baseline["probes"]]
    result = compare(baseline, score_answers(bf16, items))
    assert result["probes"] == len(baseline["probes"]) >= 30
    assert result["changed"] == 0, result
    drops = [r["logprob"] - lp for r, (lp, _, _) in zip(baseline["probes"], score_answers(bf16, items))]
    assert max(abs(d) for d in drops) > 0  # bf16 really computed something else


@pytest.fixture(scope="module")
def learner_model(tmp_path_factory, default_model_dir):
    """Tiny model whose output head is scaled up 60x. With the head as initialised, RMS-normed
    hidden states of width 64 reach logits of about +-1, so no adapter can make any token likely
    (the loss stays near ln(vocab)); scaled, a LoRA adapter learns short answers in ~100 steps."""
    from safetensors.torch import load_file, save_file

    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("learner") / "tiny", default_model_dir, seed=1,
                           tie_word_embeddings=False)
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 60
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_a_planted_changed_fact_is_named(learner_model, tmp_path, monkeypatch):
    """A base that answers twelve everyday questions with set sentences (a tiny model trained on
    them: run A), then an adapter trained from it to change one of those answers and keep the
    others (run B): the changed one is counted and shown (base answer -> tuned answer) while the
    mean retention stays above the floor. The probes are the chat ones alone, so that every probe
    is either kept by training or planted (a random model drifts on whatever it is not trained on)."""
    import mlxft.retention
    from mlxft.commands.train import verdict_lines
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    chat_only = [p for p in mlxft.retention.load_probes() if p["kind"] == "chat"][:12]
    monkeypatch.setattr(mlxft.retention, "probe_set", lambda cfg, backend: chat_only[:cfg.retention.probes])
    colours = ["red", "blue", "green", "white", "black", "brown", "pink", "grey", "gold", "orange", "purple", "silver"]
    answers = {p["id"]: f"The answer is {c}." for p, c in zip(chat_only, colours)}
    planted = chat_only[3]

    def train(name, model, answer_of, *sets):
        rows = [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": answer_of(p)}]} for p in chat_only]
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows * 4)
        cfg = build_config(None, ["train.dtype=float32", "retention.probes=12", "retention.max_new_tokens=12",
                                  "data.replay=0", "lora.rank=16", *sets],
                           {"model": str(model), "backend": "torch", "data": {"train": str(data), "valid": str(data)}})
        return train_run(cfg, tmp_path / name)

    train("a", learner_model, lambda p: answers[p["id"]], "train.steps=150", "train.learning_rate=3e-3",
          "train.eval_every=150", "retention.enabled=false")
    summary = train("b", tmp_path / "a",
                    lambda p: "The answer is never." if p is planted else answers[p["id"]],
                    "train.steps=60", "train.learning_rate=3e-3", "train.eval_every=60")
    baseline = json.loads((tmp_path / "b" / "retention_baseline.json").read_text())
    assert [r["answer"] for r in baseline["probes"]] == [answers[p["id"]] for p in chat_only]  # the base says them
    v = summary["verdict"]
    assert summary["retention"]["changed_ids"] == [planted["id"]], summary["retention"]
    assert v["changed"] == 1 and v["retention"] >= 0.9 and v["kept"], v
    shown = {c["id"]: c for c in v["answers_changed"]}
    assert shown[planted["id"]] == {"id": planted["id"], "prompt": planted["prompt"], "base": answers[planted["id"]],
                                    "tuned": "The answer is never.", "flagged": True}
    assert any(line.strip().startswith("changed:") and planted["prompt"] in line and "never" in line
               for line in verdict_lines(summary))


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_load_adapter_weights_puts_a_saved_adapter_back(varied_model, tmp_path, backend_name):
    """After more steps, loading a saved adapter into the training model gives that adapter's
    logits again (how the chosen adapter answers the probes at the end of a run)."""
    import numpy as np

    from mlxft.data import collate
    from tests.helpers.mlx import config, samples

    if backend_name == "mlx":
        pytest.importorskip("mlx_lm")
        from mlxft.backends.mlx_backend import MLXBackend as Backend
    else:
        from mlxft.backends.torch_backend import TorchBackend as Backend
    backend = Backend(config())
    backend.load(varied_model, train=True)
    batch = collate(samples(), backend.tokenizer.pad_token_id)
    ids = samples()[0].ids
    for _ in range(2):
        backend.train_step([batch], 1e-2)
    backend.save_adapter(tmp_path / "kept")
    kept = np.array(backend.logits(ids))
    for _ in range(2):
        backend.train_step([batch], 1e-2)
    assert np.abs(np.array(backend.logits(ids)) - kept).max() > 1e-3  # the later steps moved it
    backend.load_adapter_weights(tmp_path / "kept")
    # the same float32 weights computing the same logits; 1e-4 covers a different summation order
    assert np.abs(np.array(backend.logits(ids)) - kept).max() < 1e-4
