"""The adapter-selection and early-stopping policy (mlxft/selection.py) on its own: scripted
validation figures in, the kept adapter and the stop decision out; no backend, no files."""

from __future__ import annotations

import pytest

from mlxft.selection import Selection, min_improvement
from mlxft.trainer import TrainState


def feed(policy: Selection, figures, total: int | None = None):
    """Run (loss, retention score or None) pairs through the policy, one validation per step;
    return the state and the step at which it said stop (None if it never did)."""
    state = TrainState()
    total = total or len(figures)
    for step, (loss, score) in enumerate(figures, start=1):
        verdict = policy.observe(state, step, {"loss": loss, "accuracy": 1 / loss},
                                 {"score": score} if score is not None else None, last_step=step >= total)
        if verdict.stop_reason:
            return state, step
    return state, None


def test_patience_counts_validations_without_a_real_improvement():
    # 4.0 -> 3.99 is a fall of 0.01 < min_improvement(4.0) = 0.04: not an improvement
    assert min_improvement(4.0) == pytest.approx(0.04) and min_improvement(0.01) == 1e-3
    state, stopped = feed(Selection(patience=2, floor=None), [(5, None), (4, None), (3.99, None), (3.98, None),
                                                              (1, None)])
    assert stopped == 4 and state.best_step == 2 and state.best_val == 4
    # the kept adapter still follows the lowest loss, improvement threshold or not
    assert state.chosen_step == 4 and state.chosen_val == 3.98 and state.chosen_accuracy == pytest.approx(1 / 3.98)
    assert "not improved for 2 evaluations (best 4.0000 at step 2)" in state.stop_reason


def test_no_patience_never_stops_and_the_last_step_never_stops():
    assert feed(Selection(patience=None, floor=None), [(1, None), (2, None), (3, None), (4, None)])[1] is None
    assert feed(Selection(patience=1, floor=None), [(1, None), (2, None)])[1] is None  # step 2 is the last


def test_retention_floor_ranks_adapters_and_stops_when_loss_also_stalls():
    policy = Selection(patience=5, floor=0.9)
    # step 2 has the lower loss but retention below the floor: step 1 stays the kept adapter;
    # below the floor at the second validation in a row without improvement (step 4), it stops
    state, stopped = feed(policy, [(3.0, 0.95), (2.0, 0.80), (1.99, 0.85), (1.98, 0.84), (1.0, 0.5)], total=10)
    assert state.chosen_step == 1 and state.chosen_retention == {"score": 0.95}
    assert stopped == 4 and "retention 0.840 fell below retention.floor=0.9" in state.stop_reason


def test_one_validation_without_improvement_below_the_floor_does_not_stop():
    """A bump early in training is not a stall: training goes on, and the next validation that
    improves resets the count."""
    policy = Selection(patience=5, floor=0.9)
    state, stopped = feed(policy, [(3.0, 0.95), (3.1, 0.80), (1.0, 0.92), (1.2, 0.85), (0.5, 0.91)], total=10)
    assert stopped is None and state.chosen_step == 5


def test_below_the_floor_the_highest_retention_wins():
    state, _ = feed(Selection(patience=None, floor=0.9), [(3.0, 0.5), (2.0, 0.7), (1.0, 0.6)])
    assert state.chosen_step == 2
    state, _ = feed(Selection(patience=None, floor=0.9), [(3.0, 0.5), (2.0, 0.95), (1.0, 0.96)])
    assert state.chosen_step == 3  # both above the floor: the lower loss
