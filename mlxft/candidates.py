"""Adapters awaiting the forgetting guard's verdict under retention.score_at: lazy, as a pure
policy over their validation figures (no backend, no files).

Every validated adapter is a candidate: a dict with its "step", validation "loss" and
"accuracy", whether its retention was "scored", and the "retention" figures when it was. The
adapter kept is the best of all candidates by mlxft/guard_policy.py's tiers, read with the
run's final figures (the "learned" bound from the final best loss). Retention is scored lazily,
lowest validation loss first, because one scored candidate settles many unscored ones:

- a scored candidate that meets the guard (floor and cap) ranks above every candidate with a
  higher validation loss, scored or not: they are dropped unscored;
- a scored candidate that meets the floor ranks above every one that misses it;
- among candidates that miss the floor the highest retention wins; among those that meet the
  floor and miss the cap (tier 1 for good) the lowest loss wins.

So a run whose lowest-loss adapter meets the guard scores it alone; each adapter that misses
the guard costs one more scoring. With no cap (retention.max_changed null, the default) the
adapter kept is the one scoring at every validation keeps; with a cap it can differ where that
rule's running choice read an older "learned" bound (tests/test_guard_policy.py compares both).
"""

from __future__ import annotations

from mlxft.guard_policy import meets_floor, meets_guard, ranks_above, within_cap


def _score(c: dict) -> float:
    return ((c.get("retention") or {}).get("score")) or 0.0


def dominates(y: dict, x: dict, floor: float, max_changed: int | None) -> bool:
    """Whether scored candidate `y` ranks above candidate `x` however the run goes on (whatever
    x's retention, where x is unscored)."""
    if not y["scored"]:
        return False
    ry = y["retention"]
    if y["loss"] < x["loss"] and meets_guard(ry, floor, max_changed):
        return True
    if not x["scored"]:
        return False
    rx = x["retention"]
    if not meets_floor(rx, floor):
        return meets_floor(ry, floor) or (not meets_floor(ry, floor) and _score(y) > _score(x))
    if not within_cap(rx, max_changed):
        return meets_floor(ry, floor) and not within_cap(ry, max_changed) and y["loss"] < x["loss"]
    return False


def prune(candidates: list[dict], floor: float, max_changed: int | None) -> list[int]:
    """Drop the candidates another one dominates, in place; return their steps."""
    dropped = [x["step"] for x in candidates
               if any(y is not x and dominates(y, x, floor, max_changed) for y in candidates)]
    candidates[:] = [c for c in candidates if c["step"] not in dropped]
    return dropped


def unscored(candidates: list[dict]) -> list[dict]:
    return [c for c in candidates if not c["scored"]]


def next_to_score(candidates: list[dict]) -> dict | None:
    """The unscored candidate with the lowest validation loss (ties: the later one), or None."""
    waiting = unscored(candidates)
    return min(waiting, key=lambda c: (c["loss"], -c["step"])) if waiting else None


def choose(candidates: list[dict], floor: float, max_changed: int | None, learned: float) -> dict | None:
    """The best scored candidate by the guard's tiers (an earlier one wins a tie)."""
    best = None
    for c in sorted((c for c in candidates if c["scored"]), key=lambda c: c["step"]):
        if best is None or ranks_above(c["loss"], c["retention"], best["loss"], best["retention"], floor,
                                       max_changed, learned):
            best = c
    return best
