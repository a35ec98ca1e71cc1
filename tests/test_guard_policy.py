"""Scoring retention only at the validations where it can change a decision keeps the same
adapter and stops at the same step as scoring it at every validation; scoring it lazily (the
default, mlxft/candidates.py) keeps the best adapter by the run's final figures and stops at
the same step."""

from __future__ import annotations

import random

import pytest

from tests.helpers.data import write_jsonl


class _Progress:
    def message(self, text):
        pass


class _Backend:
    """Saves and loads "adapters" that only record the step whose weights they hold."""

    def __init__(self):
        self.holds = 0

    def save_adapter(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "step").write_text(str(self.holds))

    def load_adapter_weights(self, path):
        self.holds = int((path / "step").read_text())


def _simulate(mode: str, losses: list[float], rets: list[dict], patience: int | None, max_changed: int | None = 1,
              start: float | None = None, run_dir=None, margin: float | None = None) -> tuple:
    """The trainer's own _validate (and, for lazy, its choice after training) over scripted
    validation losses and retention figures; `start`: the untrained adapter's validation loss, as
    the step-0 validation records it. With `run_dir` the trainer writes its adapters there
    (lazy needs it). `margin`: retention.floor_margin (None: the default)."""
    from mlxft.config import Config
    from mlxft.runs import Run
    from mlxft.selection import MAX_UNSCORED, Selection
    from mlxft.trainer import Trainer, TrainState

    cfg = Config()
    cfg.retention.floor, cfg.retention.max_changed, cfg.retention.score_at = 0.9, max_changed, mode
    cfg.train.early_stop_patience = patience
    if margin is not None:
        cfg.retention.floor_margin = margin
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.state, trainer.total, trainer._last_val = cfg, TrainState(), len(losses), None
    trainer.writes, trainer.run, trainer.backend = run_dir is not None, Run(run_dir) if run_dir else None, _Backend()
    trainer.selection = Selection(patience, cfg.retention.floor, max_changed, mode, cfg.retention.floor_margin)
    trainer.state.initial_val = {"loss": start} if start is not None else None
    trainer.timings, trainer.retention_scored, trainer._stale_candidates = {"validation_s": 0.0, "retention_s": 0.0}, 0, []
    trainer.evaluate = lambda: {"loss": losses[trainer.state.step - 1]}
    trainer._score_retention = lambda: rets[trainer.backend.holds - 1]
    for step in range(1, len(losses) + 1):
        trainer.state.step = trainer.backend.holds = step
        stop = trainer._validate(step, None, _Progress())
        trainer._delete_candidates(trainer._stale_candidates)  # as the checkpoint after each step does
        trainer._stale_candidates = []
        if mode == "lazy":
            waiting = [c for c in trainer.state.candidates if not c["scored"]]
            assert len(waiting) <= MAX_UNSCORED
            assert {p.name for p in (run_dir / "candidates").iterdir()} == {f"step-{c['step']}"
                                                                             for c in trainer.state.candidates}
        if stop:
            break
    if mode == "lazy":
        trainer._choose_candidate()
        assert not (run_dir / "candidates").exists()
        chosen = trainer.state.chosen_step
        assert chosen is None or int((run_dir / "adapter-best" / "step").read_text()) == chosen
    s = trainer.state
    return (s.chosen_step, s.step, s.chosen_retention, s.stop_reason), trainer.retention_scored


def _random_run(rng):
    n = rng.randint(3, 14)
    loss, losses, rets, score = 5.0, [], [], 1.0
    for _ in range(n):
        loss *= rng.choice([0.7, 0.9, 0.995, 1.0, 1.05, 1.2])
        score = min(1.0, max(0.0, score + rng.uniform(-0.06, 0.03)))
        losses.append(loss)
        rets.append({"score": score, "changed": rng.choice([0, 0, 1, 2])})
    return losses, rets, rng.choice([None, 1, 2, 3]), rng.choice([None, 5.0])


def test_deciding_validations_choose_what_every_validation_chooses():
    rng = random.Random(0)
    saved = 0
    for _ in range(300):
        losses, rets, patience, start = _random_run(rng)  # start: with a step-0 loss the cap applies among adapters that learned
        every, n_every = _simulate("every", losses, rets, patience, start=start)
        deciding, n_deciding = _simulate("deciding", losses, rets, patience, start=start)
        assert deciding == every, (losses, rets, patience)
        assert n_deciding <= n_every
        saved += n_every - n_deciding
    assert saved > 0  # the rule does skip validations, or this test shows nothing


def _best_by_final_tiers(losses, rets, last, start, cap) -> int:
    """The adapter the guard's tiers rank first among validations 1..last, read with the run's
    final "learned" bound (its last real improvement) and the default margin."""
    from mlxft.config import Config
    from mlxft.guard_policy import Guard, learned_below
    from mlxft.selection import min_improvement

    best_loss = None
    for loss in losses[:last]:
        if best_loss is None or loss < best_loss - min_improvement(best_loss):
            best_loss = loss
    learned = learned_below(start, best_loss) if start is not None else float("inf")
    guard = Guard(0.9, cap, Config().retention.floor_margin)
    best = None
    for step in range(1, last + 1):
        if best is None or guard.ranks_above(losses[step - 1], rets[step - 1], losses[best - 1], rets[best - 1], learned):
            best = step
    return best


@pytest.mark.parametrize("cap", [None, 1])
def test_lazy_scoring_keeps_the_best_by_the_final_tiers(tmp_path, cap):
    """The adapter kept is the best of all validations by the guard's tiers read with the run's
    final "learned" bound: what scoring every validation and ranking at the end keeps. The stop
    is the same as scoring every validation; at most MAX_UNSCORED candidates wait on disk
    (_simulate), and without a cap it takes fewer scorings than deciding."""
    rng = random.Random(2 if cap else 1)
    differs = n_lazy = n_deciding = 0
    for i in range(300):
        losses, rets, patience, start = _random_run(rng)
        every, _ = _simulate("every", losses, rets, patience, cap, start=start)
        lazy, scored = _simulate("lazy", losses, rets, patience, cap, start=start, run_dir=tmp_path / str(i))
        assert lazy[1:2] + lazy[3:] == every[1:2] + every[3:]  # the same stop
        best = _best_by_final_tiers(losses, rets, every[1], start, cap)
        assert lazy[0] == best and lazy[2] == rets[best - 1], (losses, rets, patience, start)
        differs += lazy[0] != every[0]
        n_lazy += scored
        n_deciding += _simulate("deciding", losses, rets, patience, cap, start=start)[1]
    if cap is None:
        assert n_lazy < 0.8 * n_deciding
    else:
        assert differs > 0  # the running choice of scoring every validation does read older bounds


@pytest.mark.parametrize("max_changed, chosen", [(1, 2), (None, 4)])
def test_max_changed_joins_the_floor(max_changed, chosen):
    """The mean stays above the floor while more probes change: a cap of 1 keeps step 2."""
    rets = [{"score": 0.95, "changed": c} for c in (0, 1, 2, 3)]
    (chosen_step, *_), _ = _simulate("deciding", [4.0, 3.0, 2.0, 1.0], rets, None, max_changed)
    assert chosen_step == chosen


# Validation losses and changed counts shaped like the SmolLM2 faq benchmark run (start 2.26):
# the untrained adapters change nothing, learning changes a few probes, and late adapters vary.
FAQ_LOSSES = [2.07, 1.53, 0.91, 0.54, 0.16, 0.13, 0.03]


def test_the_cap_chooses_among_adapters_that_learned():
    """A cap of 1: the lowest-loss adapter within the cap among those that made 90% of the run's
    fall in validation loss (2.26 -> 0.03: at or below 0.03 + 0.1 * 2.23 = 0.253) is kept, here
    step 5 (0.16, one change) over step 7 (0.03, three changes)."""
    rets = [{"score": 0.95, "changed": c} for c in (0, 2, 3, 4, 1, 2, 3)]
    (chosen_step, *_), _ = _simulate("deciding", FAQ_LOSSES, rets, None, 1, start=2.26)
    assert chosen_step == 5


def test_the_cap_never_keeps_an_adapter_that_has_not_learned():
    """Only the untrained-looking first adapter (2.07: 8% of the fall) is within the cap: the
    cap cannot be met by an adapter that learned, so the lowest loss meeting the floor is kept
    (step 7), not step 1. Before the rule, a cap of 1 kept step 1 (6% on the held-out faq)."""
    rets = [{"score": 0.95, "changed": c} for c in (0, 4, 5, 7, 4, 4, 8)]
    (chosen_step, *_), _ = _simulate("deciding", FAQ_LOSSES, rets, None, 1, start=2.26)
    assert chosen_step == 7
    # the floor still ranks first: step 7 below it leaves step 6, the lowest loss above it
    below = rets[:6] + [{"score": 0.85, "changed": 0}]
    (chosen_step, *_), _ = _simulate("deciding", FAQ_LOSSES, below, None, 1, start=2.26)
    assert chosen_step == 6


def test_the_benchmark_run_that_kept_an_untrained_adapter():
    """The validation figures of the SmolLM2 faq benchmark run with a cap of 1 (start 2.258;
    docs/retention.md): the old rule kept its first validation (step 6, 6% held-out accuracy).
    No adapter that learned changed at most one probe, so now the lowest loss meeting the floor
    is kept: the 11th validation (step 66), as without a cap."""
    losses = [2.074, 1.53, 0.912, 0.544, 0.324, 0.266, 0.158, 0.127, 0.07, 0.033, 0.019, 0.032]
    scores = [0.9996, 0.9814, 0.9821, 0.9472, 0.8494, 0.9317, 0.9648, 0.9652, 0.9404, 0.9183, 0.9157, 0.9018]
    changed = [0, 4, 5, 7, 13, 8, 4, 4, 7, 9, 8, 8]
    rets = [{"score": s, "changed": c} for s, c in zip(scores, changed)]
    for cap in (1, None):
        (chosen_step, last, _, _), _ = _simulate("deciding", losses, rets, 2, cap, start=2.258)
        assert chosen_step == 11 and last == 12, cap


# Shaped like SmolLM2's faq task, seed 1, on an AMD EPYC (docs/retention.md; start 2.26, a
# validation every 6 steps): retention fell under the floor at step 24 and climbed back to 0.898
# by step 84, while validation loss fell from 0.73 at step 18 to 0.017.
SEED1_LOSSES = [2.05, 1.40, 0.73, 0.40, 0.22, 0.12, 0.07, 0.045, 0.03, 0.024, 0.020, 0.017, 0.0175, 0.018]
SEED1_SCORES = [0.995, 0.970, 0.926, 0.860, 0.849, 0.870, 0.884, 0.878, 0.889, 0.890, 0.893, 0.896, 0.897, 0.898]


@pytest.mark.parametrize("mode", ["every", "deciding", "lazy"])
def test_an_adapter_that_learned_near_the_floor_outranks_one_that_did_not(tmp_path, mode):
    """No adapter that learned meets the floor of 0.9: the lowest loss among those that learned
    and read within the margin (0.02) under it is kept (validation 12: 0.017, 0.896), not the
    step-18 adapter (validation 3: 0.73, 0.926) that the floor alone kept (12% held out on the
    EPYC). With a hard floor (margin 0) that one is kept again. Both stop at validation 14."""
    rets = [{"score": x, "changed": 0} for x in SEED1_SCORES]
    for margin, kept in ((None, 12), (0.0, 3)):
        (chosen, last, chosen_ret, _), _ = _simulate(mode, SEED1_LOSSES, rets, 2, None, start=2.26,
                                                     run_dir=tmp_path / f"{mode}-{margin}", margin=margin)
        assert (chosen, last) == (kept, 14), margin
        assert chosen_ret == rets[kept - 1]


@pytest.mark.parametrize("val, score, changed, tier", [
    (0.3, 0.95, 0, 4),   # learned, meets the floor and the cap
    (0.3, 0.95, 3, 3),   # learned, meets the floor, misses the cap
    (0.3, 0.89, 3, 2),   # learned, under the floor by less than the margin (the cap is not read)
    (1.0, 0.95, 0, 1),   # meets the floor and the cap, has not learned
    (1.0, 0.89, 0, 0),   # near the floor but has not learned
    (0.3, 0.875, 0, 0),  # learned, under the floor by more than the margin
    (0.3, 0.80, 0, 0),
])
def test_the_guards_tiers(val, score, changed, tier):
    from mlxft.guard_policy import Guard

    assert Guard(0.9, 1, 0.02).tier(val, {"score": score, "changed": changed}, learned=0.5) == tier
    # a hard floor has no tier 2
    assert Guard(0.9, 1, 0.0).tier(val, {"score": score, "changed": changed}, learned=0.5) == (tier if tier != 2 else 0)


def test_the_cap_does_not_stop_training():
    """More changed probes than the cap at a validation that did not improve is no reason to stop
    (the floor is); patience still is."""
    losses = [2.0, 1.0, 1.1, 0.5]
    rets = [{"score": 0.95, "changed": 5}] * 4
    (chosen_step, last, _, reason), _ = _simulate("every", losses, rets, None, 1, start=2.5)
    assert last == 4 and reason is None and chosen_step == 4


def test_deciding_scoring_on_a_tiny_model(tmp_path, default_model_dir):
    """A real tiny model trained off its probes with validation at every step: both ways keep
    the same adapter, with the same retention, and stop at the same step."""
    from mlxft.config import build_config
    from mlxft.pipeline import train_run
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", default_model_dir, seed=2, tie_word_embeddings=False)
    rec = {"messages": [{"role": "user", "content": "zork"}, {"role": "assistant", "content": "plugh xyzzy " * 4}]}
    data = write_jsonl(tmp_path / "d.jsonl", [rec] * 8)
    valid = write_jsonl(tmp_path / "v.jsonl", [{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]}])
    out = {}
    for mode in ("every", "deciding", "lazy"):
        cfg = build_config(None, ["train.dtype=float32", "data.replay=0", "retention.probes=6",
                                  "retention.max_new_tokens=8", "train.steps=16", "train.eval_every=1",
                                  "train.learning_rate=3e-2", "retention.floor=0.97", f"retention.score_at={mode}"],
                           {"model": str(model), "backend": "torch", "data": {"train": str(data), "valid": str(valid)}})
        out[mode] = train_run(cfg, tmp_path / mode)
    every = out["every"]
    for mode in ("deciding", "lazy"):
        got = out[mode]
        assert got["chosen_step"] == every["chosen_step"] and got["steps"] == every["steps"], mode
        assert got["retention"]["score"] == pytest.approx(every["retention"]["score"], abs=1e-6), mode
    assert out["deciding"]["retention_scored"] <= every["retention_scored"] == every["steps"]
    assert out["lazy"]["retention_scored"] <= out["deciding"]["retention_scored"]
    assert not (tmp_path / "lazy" / "candidates").exists()
