"""The forgetting guard's rules as pure functions: whether an adapter's retention figures meet
the guard (the floor on the mean and the cap on changed probes), how two adapters rank, and at
which validations retention has to be scored at all.

Ranking (the trainer keeps the best adapter in RUN/adapter-best), in three tiers:

2. the mean meets the floor, at most `max_changed` probes changed, and the adapter has learned:
   its validation loss made at least LEARNED_SHARE (90%) of the fall from the untrained
   adapter's loss (the step-0 validation) to the best loss so far;
1. the mean meets the floor (but the cap is missed, or the adapter has not learned yet);
0. the mean misses the floor.

A higher tier wins; within tiers 2 and 1 the lower validation loss wins, within tier 0 the
higher mean retention. The cap thus chooses among adapters that learned, and never keeps an
adapter that has barely trained merely because training had not yet changed anything (the
untrained adapter changes no probe). With no cap (max_changed null) tiers 2 and 1 are one.

Scoring retention costs a forward pass over every probe answer. The default, retention.score_at:
lazy, scores it after training for the candidates still in the running (mlxft/candidates.py).
With score_at: deciding it is scored during training only where its value can change what happens:

- no adapter is chosen yet, or the chosen one is not in tier 2 (then a candidate in a higher
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


LEARNED_SHARE = 0.9  # an adapter has learned once it made this share of the run's fall in validation loss


def learned_below(start: float | None, best: float | None) -> float:
    """The validation loss at or below which an adapter counts as having learned: LEARNED_SHARE
    of the way from the untrained adapter's loss `start` to the best loss so far. Unknown start
    (no step-0 validation): every adapter counts."""
    if start is None or best is None:
        return float("inf")
    return best + (1.0 - LEARNED_SHARE) * max(0.0, start - best)


def meets_floor(ret: dict | None, floor: float) -> bool:
    """Whether the mean retention is at or above the floor. No figures (retention off or not
    scored) pass."""
    return not ret or ret.get("score") is None or ret["score"] >= floor


def within_cap(ret: dict | None, max_changed: int | None) -> bool:
    changed = (ret or {}).get("changed")
    return max_changed is None or changed is None or changed <= max_changed


def meets_guard(ret: dict | None, floor: float, max_changed: int | None) -> bool:
    """Whether retention figures pass: mean at or above the floor and at most max_changed probes
    changed (None: not capped). No figures (retention off or not scored) pass."""
    if not ret or ret.get("score") is None:
        return True
    return meets_floor(ret, floor) and within_cap(ret, max_changed)


def tier(val: float, ret: dict | None, floor: float, max_changed: int | None, learned: float) -> int:
    """2, 1 or 0 as in the module docstring; `learned` is learned_below(...) of the run so far."""
    if not meets_floor(ret, floor):
        return 0
    if max_changed is None:
        return 2
    return 2 if within_cap(ret, max_changed) and val <= learned else 1


def ranks_above(candidate_val: float, candidate_ret: dict | None, chosen_val: float | None,
                chosen_ret: dict | None, floor: float, max_changed: int | None,
                learned: float = float("inf")) -> bool:
    """Whether a candidate adapter replaces the chosen one (None: nothing chosen yet)."""
    if chosen_val is None:
        return True
    mine, theirs = (tier(candidate_val, candidate_ret, floor, max_changed, learned),
                    tier(chosen_val, chosen_ret, floor, max_changed, learned))
    if mine != theirs:
        return mine > theirs
    if mine:
        return candidate_val < chosen_val
    return (candidate_ret or {}).get("score", 0.0) > (chosen_ret or {}).get("score", 0.0)


def retention_can_decide(val: float, floor_can_stop: bool, chosen_val: float | None,
                         chosen_ret: dict | None, floor: float, max_changed: int | None,
                         learned: float = float("inf")) -> bool:
    """Whether retention's value at this validation can change the chosen adapter or the stop
    (`floor_can_stop`: the floor's own stop would fire here if retention were below it)."""
    if chosen_val is None or tier(chosen_val, chosen_ret, floor, max_changed, learned) < 2:
        return True
    if val < chosen_val:
        return True
    return floor_can_stop
