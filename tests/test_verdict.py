"""The end-of-run verdict (mlxft.pipeline.verdict and its lines in `mlxft train`) says when the
guard kept an adapter from before the run learned, and when the adapter kept reads under the
floor within retention.floor_margin."""

from __future__ import annotations

from mlxft.commands.train import verdict_lines
from mlxft.config import Config
from mlxft.pipeline import verdict


def _summary(chosen_step: int, chosen_loss: float, score: float) -> dict:
    summary = {"initial_val": {"loss": 2.26, "accuracy": 0.5}, "best_val_loss": 0.017, "steps": 84,
               "chosen_step": chosen_step, "chosen_val_loss": chosen_loss, "chosen_accuracy": 0.9,
               "retention": {"score": score, "probes": 24, "changed": 5}}
    cfg = Config()
    cfg.retention.floor = 0.9
    summary["verdict"] = verdict(cfg, summary)
    return summary


def test_an_adapter_kept_from_before_the_run_learned_is_named():
    s = _summary(18, 0.73, 0.926)
    v = s["verdict"]
    assert v["kept"] and not v["near_floor"] and abs(v["learned_share"] - (2.26 - 0.73) / (2.26 - 0.017)) < 1e-9
    learned = next(line for line in verdict_lines(s) if line.startswith("learned:"))
    assert "only 68% of the run's fall (to 0.017)" in learned
    assert "lowest validation loss among those meeting the guard" in verdict_lines(s)[-1]


def test_an_adapter_that_learned_within_the_margin_says_the_floor_was_missed():
    s = _summary(72, 0.017, 0.896)
    v = s["verdict"]
    assert not v["kept"] and v["learned_share"] == 1.0 and v["near_floor"]
    lines = verdict_lines(s)
    assert not any("only" in line for line in lines)
    kept = next(line for line in lines if line.startswith("kept:"))
    assert "under the floor by 0.004, within retention.floor_margin=0.02" in kept
    assert "among those that learned, near the floor" in lines[-1]


def test_a_plain_verdict_says_neither():
    s = _summary(72, 0.017, 0.95)
    lines = verdict_lines(s)
    assert s["verdict"]["kept"]
    assert not any("only" in line or "floor_margin" in line for line in lines), lines
    far = _summary(72, 0.017, 0.85)  # under the floor by more than the margin
    assert not far["verdict"]["near_floor"]
    assert any("the guard was not met" in line for line in verdict_lines(far))
    assert "the highest retention reached" in verdict_lines(far)[-1]
