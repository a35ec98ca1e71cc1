"""Adapters awaiting the forgetting guard's verdict under retention.score_at: lazy, as a pure
policy over their validation figures (no backend, no files).

Every validated adapter is a candidate: a dict with its "step", validation "loss" and
"accuracy", whether its retention was "scored", and the "retention" figures when it was. The
adapter kept is the best of all candidates by mlxft/guard_policy.py's tiers, read with the
run's final figures (the "learned" bound from the final best loss). Retention is scored lazily,
lowest validation loss first, because one scored candidate settles many unscored ones:

- a scored candidate that meets the guard (floor and cap) ranks above every candidate with a
  higher validation loss, scored or not: they are dropped unscored;
- a scored candidate that meets the floor ranks above every one whose mean is under the floor by
  the margin or more, and above every one under the floor with a higher validation loss (that
  one learned only if the other did too);
- among candidates under the floor by the margin or more the highest retention wins; among
  those that meet the floor and miss the cap the lowest loss wins.

So a run whose lowest-loss adapter meets the guard scores it alone; each adapter that misses
the guard costs one more scoring. The adapter kept can differ from the one scoring at every
validation keeps where that rule's running choice read an older "learned" bound (which decides
the cap's tiers and the floor margin's; tests/test_guard_policy.py compares both).
"""

from __future__ import annotations

from mlxft.guard_policy import Guard


def _score(c: dict) -> float:
    return ((c.get("retention") or {}).get("score")) or 0.0


def dominates(y: dict, x: dict, guard: Guard) -> bool:
    """Whether scored candidate `y` ranks above candidate `x` however the run goes on (whatever
    x's retention, where x is unscored, and whatever the run's final "learned" bound, which only
    falls: an adapter with a lower loss than one that learned has learned too)."""
    if not y["scored"]:
        return False
    ry = y["retention"]
    if y["loss"] < x["loss"] and guard.meets(ry):
        return True
    if not x["scored"]:
        return False
    rx = x["retention"]
    if not guard.meets_floor(rx):
        if not guard.near_floor(rx):  # tier 0 for good
            return guard.meets_floor(ry) or _score(y) > _score(x)
        return guard.meets_floor(ry) and y["loss"] < x["loss"]
    if not guard.within_cap(rx):
        return guard.meets_floor(ry) and not guard.within_cap(ry) and y["loss"] < x["loss"]
    return False


def prune(candidates: list[dict], guard: Guard) -> list[int]:
    """Drop the candidates another one dominates, in place; return their steps."""
    dropped = [x["step"] for x in candidates
               if any(y is not x and dominates(y, x, guard) for y in candidates)]
    candidates[:] = [c for c in candidates if c["step"] not in dropped]
    return dropped


def unscored(candidates: list[dict]) -> list[dict]:
    return [c for c in candidates if not c["scored"]]


def next_to_score(candidates: list[dict]) -> dict | None:
    """The unscored candidate with the lowest validation loss (ties: the later one), or None."""
    waiting = unscored(candidates)
    return min(waiting, key=lambda c: (c["loss"], -c["step"])) if waiting else None


def choose(candidates: list[dict], guard: Guard, learned: float) -> dict | None:
    """The best scored candidate by the guard's tiers (an earlier one wins a tie)."""
    best = None
    for c in sorted((c for c in candidates if c["scored"]), key=lambda c: c["step"]):
        if best is None or guard.ranks_above(c["loss"], c["retention"], best["loss"], best["retention"], learned):
            best = c
    return best
