"""The forgetting guard's rules as pure functions: whether an adapter's retention figures meet
the guard (the floor on the mean and the cap on changed probes), how two adapters rank, and at
which validations retention has to be scored at all.

Ranking (the trainer keeps the best adapter in RUN/adapter-best): an adapter that meets the
guard ranks above one that does not; among those that meet it the lower validation loss wins;
among those that do not, the higher mean retention.

Scoring retention costs a forward pass over every probe answer, so with retention.score_at:
deciding (the default) it is scored only where its value can change what happens:

- no adapter is chosen yet, or the chosen one does not meet the guard (then a candidate with a
  higher mean would replace it, whatever its validation loss);
- the candidate's validation loss is below the chosen adapter's (it replaces the chosen one iff
  it meets the guard);
- validation did not improve and patience has not run out (the guard's own stop fires when
  retention misses it there).

Everywhere else the decision is the same whatever retention reads, so the adapter chosen and the
step training stops at equal those of scoring at every validation (retention.score_at: every).
"""

from __future__ import annotations


def meets_guard(ret: dict | None, floor: float, max_changed: int | None) -> bool:
    """Whether retention figures pass: mean at or above the floor and at most max_changed probes
    changed (None: not capped). No figures (retention off or not scored) pass."""
    if not ret or ret.get("score") is None:
        return True
    if ret["score"] < floor:
        return False
    changed = ret.get("changed")
    return max_changed is None or changed is None or changed <= max_changed


def ranks_above(candidate_val: float, candidate_ret: dict | None, chosen_val: float | None,
                chosen_ret: dict | None, floor: float, max_changed: int | None) -> bool:
    """Whether a candidate adapter replaces the chosen one (None: nothing chosen yet)."""
    if chosen_val is None:
        return True
    meets, chosen_meets = (meets_guard(candidate_ret, floor, max_changed),
                           meets_guard(chosen_ret, floor, max_changed))
    if meets != chosen_meets:
        return meets
    if meets:
        return candidate_val < chosen_val
    return (candidate_ret or {}).get("score", 0.0) > (chosen_ret or {}).get("score", 0.0)


def retention_can_decide(val: float, improved: bool, patience_ran_out: bool, chosen_val: float | None,
                         chosen_ret: dict | None, floor: float, max_changed: int | None) -> bool:
    """Whether retention's value at this validation can change the chosen adapter or the stop."""
    if chosen_val is None or not meets_guard(chosen_ret, floor, max_changed):
        return True
    if val < chosen_val:
        return True
    return not improved and not patience_ran_out
