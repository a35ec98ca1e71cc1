"""Which adapter a run keeps and when it stops: a pure policy over the validation figures, with
no backend, files or clock, so every rule is unit-tested on its own.

At every validation the current adapter is scored on validation loss and, when retention is
tracked and retention.score_at asks for it, on retention. Adapters that meet the guard
(retention at least `floor`; at most `max_changed` changed probes among adapters that learned)
rank above those that do not, and where none that learned meets the floor, one that learned and
reads less than `floor_margin` under it ranks above those that have not learned; within a tier
the lowest validation loss wins, among the rest the highest retention (mlxft/guard_policy.py has
the tiers). That one is kept as RUN/adapter-best (what
generate, fuse and export use).

Training stops after `patience` validations without improvement (a fall of at least
min_improvement), or sooner where retention is below the floor at the FLOOR_STALL-th validation
in a row that did not improve. Not at the first: one validation that did not improve is often a
bump early in training, not a stall (Gemma 3 270M's style task, AMD EPYC, seed 0: the floor
stopped it at step 14 of 170, bumped from 0.398 to 0.449, and kept a step-7 adapter that
answered 0% of the held-out questions; unguarded, step 14 read 0.189 and the run reached 100%).
With the default patience of 2 the floor's stop thus coincides with patience's, and retention
need not be scored at validations that did not improve. The cap on changed probes chooses the
adapter and does not stop training. The last step never stops early (there is nothing left to
stop).

With score_at "lazy" (the default) no adapter is chosen during training: every validated
adapter becomes a candidate (mlxft/candidates.py), retention is scored at the validations that
did not improve where the floor's stop can read it (from the FLOOR_STALL-th in a row, while
patience has not run out), and at any validation once MAX_UNSCORED candidates wait unscored, and
`resolve` picks the adapter after training, scoring the candidates still in the running lowest
loss first.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxft import candidates
from mlxft.guard_policy import Guard, learned_below

# Candidates waiting unscored (each an adapter on disk) before a validation that improved scores
# its own adapter anyway: bounds the disk a lazy run holds to this many adapters, plus the few
# scored ones still in the running.
MAX_UNSCORED = 6

# Validations in a row without improvement at which retention below the floor stops training.
FLOOR_STALL = 2


def min_improvement(best: float) -> float:
    """How much validation loss must fall to count as still improving for early stopping: 1% of
    it, and at least 1e-3 nats/token (a set learned to ~0.001 otherwise creeps down by 1e-5 per
    validation for hundreds of steps while retention sinks)."""
    return max(1e-3, 0.01 * best)


@dataclass
class Verdict:
    keep: bool               # this adapter ranks above the one kept so far: keep it
    stop_reason: str | None  # why training should stop now, or None
    candidate: bool = False  # score_at lazy: keep this adapter as a candidate (mlxft/candidates.py)
    dropped: tuple = ()      # score_at lazy: steps of candidates no longer in the running


@dataclass
class Selection:
    """The policy; it reads and updates the selection fields of the trainer's checkpointed state
    (best_val, best_step, evals_since_best, chosen_step, chosen_val, chosen_accuracy,
    chosen_retention, stop_reason). The guard's own rules (meeting it, ranking two adapters,
    when retention can decide) are mlxft/guard_policy.py's."""

    patience: int | None
    floor: float | None
    max_changed: int | None = None
    score_at: str = "every"   # retention.score_at: "every" validation, only where "deciding", or "lazy"
    floor_margin: float = 0.0  # retention.floor_margin: guard_policy's tier 2

    @property
    def guard(self) -> Guard:
        return Guard(self.floor if self.floor is not None else float("-inf"), self.max_changed, self.floor_margin)

    def _learned(self, state) -> float:
        start = (state.initial_val or {}).get("loss")
        return learned_below(start, state.best_val)

    def _improved(self, state, loss: float) -> bool:
        return state.best_val is None or loss < state.best_val - min_improvement(state.best_val)

    def needs_retention(self, state, loss: float) -> bool:
        """Whether retention has to be scored at a validation with this loss: always under
        score_at "every"; under "deciding" only where its value can change the kept adapter or
        the stop (guard_policy.retention_can_decide)."""
        if self.score_at == "every":
            return True
        improved = self._improved(state, loss)
        stalled = 0 if improved else state.evals_since_best + 1
        floor_can_stop = stalled >= FLOOR_STALL and not (self.patience and stalled >= self.patience)
        if self.score_at == "lazy":
            return floor_can_stop or len(candidates.unscored(state.candidates)) >= MAX_UNSCORED
        chosen_val = state.chosen_val if state.chosen_step is not None else None
        return self.guard.retention_can_decide(loss, floor_can_stop, chosen_val, state.chosen_retention,
                                               self._learned(state))

    def observe(self, state, step: int, val: dict, retention: dict | None, last_step: bool) -> Verdict:
        """Record the validation at `step` (`val`: loss and accuracy; `retention`: a dict with
        "score" and "changed", or None) in `state`, and say whether to keep this adapter and
        whether to stop."""
        score = retention.get("score") if retention else None
        loss = val["loss"]
        improved = self._improved(state, loss)
        if improved:
            state.best_val, state.best_step = loss, step
            state.evals_since_best = 0
        else:
            state.evals_since_best += 1
        if self.score_at == "lazy":
            keep = False
            state.candidates.append({"step": step, "loss": loss, "accuracy": val.get("accuracy"),
                                     "scored": retention is not None, "retention": retention})
            dropped = candidates.prune(state.candidates, self.guard)
            candidate = step not in dropped
        else:
            chosen_val = state.chosen_val if state.chosen_step is not None else None
            keep = self.guard.ranks_above(loss, retention, chosen_val, state.chosen_retention, self._learned(state))
            if keep:
                state.chosen_step, state.chosen_val, state.chosen_retention = step, loss, retention
                state.chosen_accuracy = val.get("accuracy")
            candidate, dropped = False, []
        if last_step:
            return Verdict(keep, None, candidate, tuple(dropped))
        misses_floor = score is not None and not self.guard.meets_floor(retention)
        if self.patience and state.evals_since_best >= self.patience:
            state.stop_reason = (f"validation loss has not improved for {self.patience} evaluations "
                                 f"(best {state.best_val:.4f} at step {state.best_step})")
        elif misses_floor and state.evals_since_best >= FLOOR_STALL:
            state.stop_reason = (f"retention {score:.3f} fell below retention.floor={self.floor:g} "
                                 "and validation loss stopped improving")
        return Verdict(keep, state.stop_reason, candidate, tuple(dropped))

    # ------------------------------------------------------------------ score_at: lazy

    def next_to_score(self, state) -> int | None:
        """After training: the step of the candidate to score next, or None when the choice is settled."""
        c = candidates.next_to_score(state.candidates)
        return c["step"] if c else None

    def scored(self, state, step: int, retention: dict | None) -> list[int]:
        """Record the retention of candidate `step`; return the steps of candidates dropped."""
        for c in state.candidates:
            if c["step"] == step:
                c["scored"], c["retention"] = True, retention
        return candidates.prune(state.candidates, self.guard)

    def resolve(self, state) -> int | None:
        """Choose among the scored candidates (call once next_to_score is None); return its step."""
        best = candidates.choose(state.candidates, self.guard, self._learned(state))
        if best is not None:
            state.chosen_step, state.chosen_val = best["step"], best["loss"]
            state.chosen_retention, state.chosen_accuracy = best["retention"], best["accuracy"]
        return state.chosen_step
