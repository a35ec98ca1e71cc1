"""Which adapter a run keeps and when it stops: a pure policy over the validation figures, with
no backend, files or clock, so every rule is unit-tested on its own.

At every validation the current adapter is scored on validation loss and, when retention is
tracked, on retention. Adapters whose retention is at least `floor` rank above those below it;
among them the lowest validation loss wins, and below the floor the highest retention. That one
is kept as RUN/adapter-best (what generate, fuse and export use).

Training stops after `patience` validations without improvement (a fall of at least
min_improvement), or as soon as retention is below the floor at a validation that did not
improve. The last step never stops early (there is nothing left to stop).
"""

from __future__ import annotations

from dataclasses import dataclass


def min_improvement(best: float) -> float:
    """How much validation loss must fall to count as still improving for early stopping: 1% of
    it, and at least 1e-3 nats/token (a set learned to ~0.001 otherwise creeps down by 1e-5 per
    validation for hundreds of steps while retention sinks)."""
    return max(1e-3, 0.01 * best)


@dataclass
class Verdict:
    keep: bool               # this adapter ranks above the one kept so far: keep it
    stop_reason: str | None  # why training should stop now, or None


@dataclass
class Selection:
    """The policy; it reads and updates the selection fields of the trainer's checkpointed state
    (best_val, best_step, evals_since_best, chosen_step, chosen_val, chosen_accuracy,
    chosen_retention, stop_reason)."""

    patience: int | None
    floor: float | None

    def observe(self, state, step: int, val: dict, retention: dict | None, last_step: bool) -> Verdict:
        """Record the validation at `step` (`val`: loss and accuracy; `retention`: a dict with
        "score", or None) in `state`, and say whether to keep this adapter and whether to stop."""
        score = retention.get("score") if retention else None
        loss = val["loss"]
        improved = state.best_val is None or loss < state.best_val - min_improvement(state.best_val)
        if improved:
            state.best_val, state.best_step = loss, step
            state.evals_since_best = 0
        else:
            state.evals_since_best += 1
        keep = self.ranks_above_chosen(state, loss, score)
        if keep:
            state.chosen_step, state.chosen_val, state.chosen_retention = step, loss, retention
            state.chosen_accuracy = val.get("accuracy")
        if last_step:
            return Verdict(keep, None)
        if self.patience and state.evals_since_best >= self.patience:
            state.stop_reason = (f"validation loss has not improved for {self.patience} evaluations "
                                 f"(best {state.best_val:.4f} at step {state.best_step})")
        elif score is not None and self.floor is not None and score < self.floor and not improved:
            state.stop_reason = (f"retention {score:.3f} fell below retention.floor={self.floor:g} and "
                                 "validation loss stopped improving")
        return Verdict(keep, state.stop_reason)

    def ranks_above_chosen(self, state, loss: float, score: float | None) -> bool:
        if state.chosen_step is None:
            return True
        chosen_score = (state.chosen_retention or {}).get("score")
        floor = self.floor if self.floor is not None else float("-inf")
        meets = score is None or score >= floor
        chosen_meets = chosen_score is None or chosen_score >= floor
        if meets != chosen_meets:
            return meets
        if meets:
            return loss < state.chosen_val
        return score > chosen_score
