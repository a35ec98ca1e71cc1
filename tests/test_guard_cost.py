"""The guard's cheaper parts: at the end of a run only the probes whose base answer the chosen
adapter no longer predicts top-1 throughout are regenerated, since greedy decoding gives every
other probe the base's answer token for token, and only as many as the verdict shows. And what the `time:` line charges to the replay
steps (mlxft/guard_cost.py)."""

from __future__ import annotations

import pytest

# Spread of the random LoRA B weights: this tiny model's logits are near-ties (about +-1 over
# 49k tokens), so 1e-3 already moves 6 of its 24 probe answers off top-1 and leaves the rest
# (1e-4 moved 1, 3e-3 moved 16): both kinds are present for the check.
SCALE = 1e-3


@pytest.fixture(scope="module")
def engine(tmp_path_factory, default_model_dir):
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("cost") / "tiny", default_model_dir, seed=1,
                           tie_word_embeddings=False)
    cfg = build_config(None, ["train.dtype=float32", "retention.probes=24", "retention.max_new_tokens=12",
                              "lora.rank=8"])
    backend = TorchBackend(cfg)
    backend.load(path, train=True)
    return cfg, backend


def test_only_diverged_probes_are_regenerated_and_the_rest_keep_the_base_answer(engine, monkeypatch):
    import torch

    import mlxft.probe_changes as probe_changes
    from mlxft.retention import _answers, _eval_mode, build_baseline, compare, score_answers

    cfg, backend = engine
    baseline = build_baseline(cfg, backend)  # a fresh adapter: the base model
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that moves some answers and not others
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, SCALE)
    items = [(r["prompt_ids"], r["answer_ids"]) for r in baseline["probes"]]
    result = compare(baseline, score_answers(backend, items))
    diverged = set(result["diverged_ids"])
    assert 0 < len(diverged) < len(items), result  # the check below is not empty either way
    with _eval_mode(backend):
        again = _answers(backend, [r["prompt_ids"] for r in baseline["probes"]], baseline["max_new_tokens"])
    for row, (ids, _) in zip(baseline["probes"], again):
        if row["id"] not in diverged:
            assert ids == row["answer_ids"], row["id"]
    monkeypatch.setattr(probe_changes, "MAX_SHOWN", 100)
    summary = {"chosen_step": 1, "steps": 1}
    every, n_every = probe_changes.chosen_answers(cfg, None, backend, summary, baseline, set())
    only, n_only = probe_changes.chosen_answers(cfg, None, backend, summary, baseline, set(), diverged)
    assert only == every and every
    assert (n_every, n_only) == (len(items), len(diverged))

    # Shown at most 2 at a time: flagged probes first, and answered in rounds of 2 until 2
    # changed answers are found, the same 2 the verdict would show after answering them all.
    flagged = {c["id"] for c in every[-2:]}
    monkeypatch.setattr(probe_changes, "MAX_SHOWN", 2)
    few, n_few = probe_changes.chosen_answers(cfg, None, backend, summary, baseline, flagged, diverged)
    assert [c["id"] for c in few] == [c["id"] for c in every if c["id"] in flagged]
    assert all(c["flagged"] for c in few) and n_few == 2
    unflagged, n_unflagged = probe_changes.chosen_answers(cfg, None, backend, summary, baseline, set(), diverged)
    assert unflagged == every[:2] and 2 <= n_unflagged <= len(diverged)


def test_replay_steps_are_charged_for_steps_beyond_the_unguarded_budget_and_for_longer_batches():
    from mlxft.guard_cost import replay_steps_seconds

    # Replay half the samples, as long as the user's: a run that stopped within the unguarded
    # run's budget (170 of 340 planned steps) cost nothing more per step ...
    assert replay_steps_seconds(100.0, 117, 340, 68, 136, 5000, 10000) == 0.0
    # ... one that ran all 340 steps took 170 steps the unguarded run would not have.
    assert replay_steps_seconds(340.0, 340, 340, 68, 136, 5000, 10000) == pytest.approx(170.0)
    # Replay answers twice as long as the user's samples: a mixed batch holds 1.5x the tokens of
    # a batch of user samples, so a third of each step's time is replay's.
    assert replay_steps_seconds(90.0, 100, 340, 68, 136, 2 * 5000, 3 * 5000) == pytest.approx(30.0)
    assert replay_steps_seconds(90.0, 100, 340, 0, 68, 0, 5000) == 0.0  # no replay

