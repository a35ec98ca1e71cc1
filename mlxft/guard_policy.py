"""The forgetting guard's rules as pure functions: whether an adapter's retention figures meet
the guard (the floor on the mean and the cap on changed probes), how two adapters rank, and at
which validations retention has to be scored at all.

An adapter has *learned* once its validation loss made at least LEARNED_SHARE (90%) of the fall
from the untrained adapter's loss (the step-0 validation) to the best loss so far. Ranking (the
trainer keeps the best adapter in RUN/adapter-best), in five tiers:

4. the mean meets the floor, at most `max_changed` probes changed, and the adapter has learned;
3. the mean meets the floor and the adapter has learned (the cap is missed);
2. the adapter has learned and its mean is under the floor by less than `margin`
   (retention.floor_margin): where no adapter that learned meets the floor;
1. the mean meets the floor, but the adapter has not learned;
0. the rest: the mean is under the floor (by `margin` or more, or at all if it has not learned).

A higher tier wins; within tiers 4 to 1 the lower validation loss wins, within tier 0 the higher
mean retention. The cap thus chooses among adapters that learned, and the guard never keeps an
adapter that has barely trained merely because training had not yet changed anything (the
untrained adapter changes no probe), nor because its mean read a little higher than that of the
adapters that learned: the mean of 24 probes moves by 0.014-0.022 between neighbouring
validations and has a standard error of about 0.03 (docs/retention.md), so a mean 0.002 under
the floor is no evidence of more forgetting than one 0.03 above it. On an AMD EPYC, SmolLM2's
faq task (seed 1) fell under the floor of 0.9 at step 24 and climbed back to 0.898 by step 84;
without tier 2 the floor kept step 18 (validation loss 0.73 against 0.017), which answered 12% of
the held-out questions where the unguarded run answered 81%. With no cap (max_changed null)
tiers 4 and 3 are one.

Scoring retention costs a forward pass over every probe answer. The default, retention.score_at:
lazy, scores it after training for the candidates still in the running (mlxft/candidates.py).
With score_at: deciding it is scored during training only where its value can change what happens:

- no adapter is chosen yet, or the chosen one is not in tier 4 (then a candidate in a higher
  tier, or with a higher mean, could replace it whatever its validation loss);
- the candidate's validation loss is below the chosen adapter's (it replaces the chosen one iff
  its tier is at least the chosen one's);
- the floor's own stop can fire here (the selection.FLOOR_STALL-th validation in a row that
  did not improve, patience not yet run out) when the mean is below it.

Everywhere else the decision is the same whatever retention reads (the chosen adapter's tier
can only change when the best loss falls, and that happens only at a validation whose loss is
below the chosen one's), so the adapter chosen and the step training stops at equal those of
scoring at every validation (retention.score_at: every).
"""

from __future__ import annotations

from dataclasses import dataclass

LEARNED_SHARE = 0.9  # an adapter has learned once it made this share of the run's fall in validation loss
TOP_TIER = 4
NEAR_FLOOR_TIER = 2  # learned, and under the floor by less than the margin


def learned_below(start: float | None, best: float | None) -> float:
    """The validation loss at or below which an adapter counts as having learned: LEARNED_SHARE
    of the way from the untrained adapter's loss `start` to the best loss so far. Unknown start
    (no step-0 validation): every adapter counts."""
    if start is None or best is None:
        return float("inf")
    return best + (1.0 - LEARNED_SHARE) * max(0.0, start - best)


def learned_share(start: float | None, best: float | None, loss: float | None) -> float | None:
    """The share of the run's fall in validation loss (`start` to `best`) that an adapter with
    validation loss `loss` made; None where unknown or where the run did not fall at all."""
    if start is None or best is None or loss is None or start <= best:
        return None
    return max(0.0, min(1.0, (start - loss) / (start - best)))


def _score(ret: dict | None) -> float | None:
    return (ret or {}).get("score")


@dataclass(frozen=True)
class Guard:
    """The guard a run keeps: `floor` on the mean retention (-inf: off), `max_changed` probes
    changed at most (None: not capped), and `margin`, how far under the floor an adapter that
    learned may read and still rank above the ones that did not learn (tier 2)."""

    floor: float = float("-inf")
    max_changed: int | None = None
    margin: float = 0.0

    def meets_floor(self, ret: dict | None) -> bool:
        """Whether the mean retention is at or above the floor. No figures (retention off or not
        scored) pass."""
        return _score(ret) is None or _score(ret) >= self.floor

    def near_floor(self, ret: dict | None) -> bool:
        """At or above the floor, or under it by less than the margin."""
        return self.meets_floor(ret) or _score(ret) > self.floor - self.margin

    def within_cap(self, ret: dict | None) -> bool:
        changed = (ret or {}).get("changed")
        return self.max_changed is None or changed is None or changed <= self.max_changed

    def meets(self, ret: dict | None) -> bool:
        """Whether retention figures pass: mean at or above the floor and at most max_changed
        probes changed. No figures (retention off or not scored) pass."""
        return self.meets_floor(ret) and self.within_cap(ret)

    def tier(self, val: float, ret: dict | None, learned: float) -> int:
        """4 to 0 as in the module docstring; `learned` is learned_below(...) of the run so far."""
        has_learned = val <= learned
        if self.meets_floor(ret):
            if not has_learned:
                return 1
            return 4 if self.within_cap(ret) else 3
        return NEAR_FLOOR_TIER if has_learned and self.near_floor(ret) else 0

    def ranks_above(self, candidate_val: float, candidate_ret: dict | None, chosen_val: float | None,
                    chosen_ret: dict | None, learned: float = float("inf")) -> bool:
        """Whether a candidate adapter replaces the chosen one (None: nothing chosen yet)."""
        if chosen_val is None:
            return True
        mine, theirs = self.tier(candidate_val, candidate_ret, learned), self.tier(chosen_val, chosen_ret, learned)
        if mine != theirs:
            return mine > theirs
        if mine:
            return candidate_val < chosen_val
        return (_score(candidate_ret) or 0.0) > (_score(chosen_ret) or 0.0)

    def retention_can_decide(self, val: float, floor_can_stop: bool, chosen_val: float | None,
                             chosen_ret: dict | None, learned: float = float("inf")) -> bool:
        """Whether retention's value at this validation can change the chosen adapter or the stop
        (`floor_can_stop`: the floor's own stop would fire here if retention were below it)."""
        if chosen_val is None or self.tier(chosen_val, chosen_ret, learned) < TOP_TIER:
            return True
        if val < chosen_val:
            return True
        return floor_can_stop
