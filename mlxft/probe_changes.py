"""Per-probe retention: which probes the tuned model would no longer answer as the base did.

The mean retention score (mlxft.retention) can stay high while one everyday answer is lost.
So every scoring also counts the probes whose answer changed. A probe counts as changed when
both hold, teacher-forced on the base model's own greedy answer:

- the tuned model no longer predicts every token of it top-1 where the base did (greedy decoding
  would leave the base's answer at that position), and
- the whole answer became more than CHANGE_NATS less likely (4x), so the flip is not a near-tie
  between two tokens that rounding alone can reorder.

Calibration: the base model scored against its own baseline in another dtype (bf16 weights
against the f32 baseline) flips near-ties only; its whole-answer log-likelihood moves by
rounding, far below ln 4 (tests/test_probe_changes.py checks that none is flagged; the measured
figures for the real models are in docs/retention.md).

Other rules were measured against this one on real tuned adapters (scripts/compare_probe_rules.py:
the first sentence only, the answer up to its first flipped token, the first flipped token
alone, any flipped token); each missed a lost fact that this one counts, or counted more
rewordings, and none counted fewer real changes (docs/retention.md has the table).

At the end of a run the chosen adapter answers the probes again, in one batch, and the answers
that differ in content from the base's (case and spacing aside) are listed, flagged ones
first, at most MAX_SHOWN of them: that is what the verdict shows. Only the probes whose base
answer the adapter no longer predicts top-1 at every token are regenerated: on the others greedy
decoding gives the base's answer token for token (up to rounding in near-ties), so they cannot
have changed. And they are regenerated MAX_SHOWN at a time, flagged ones first, until MAX_SHOWN
changed answers are found: the verdict shows no more, and a flagged probe's answer has almost
always changed, so one small batch usually suffices (the count of changed probes comes from the
teacher-forced figures, not from these answers).
"""

from __future__ import annotations

import math

CHANGE_NATS = math.log(4.0)
MAX_SHOWN = 5


def is_changed(base_row: dict, logprob: float, tokens: int, correct: int) -> bool:
    """Whether the tuned model's teacher-forced figures on one baseline answer say it changed."""
    base_correct = round(base_row["agreement"] * base_row["tokens"])
    return correct < base_correct and logprob - base_row["logprob"] < -CHANGE_NATS


def _same_content(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def chosen_answers(cfg, run, backend, summary: dict, baseline: dict, flagged: set[str],
                   diverged: set[str] | None = None) -> tuple[list[dict], int]:
    """The chosen adapter's greedy answers to the probes, compared with the base's: the probes
    whose answer changed in content, flagged first, at most MAX_SHOWN; and how many probes were
    regenerated to find them. `diverged`: the probes that may have changed (those not predicted
    top-1 throughout); None: all."""
    from mlxft.retention import _answers, _eval_mode

    if summary.get("chosen_step") != summary.get("steps"):
        backend.load_adapter_weights(run.best_adapter)  # the model holds the last step's adapter
    rows = [r for r in baseline["probes"] if diverged is None or r["id"] in diverged]
    rows.sort(key=lambda r: r["id"] not in flagged)
    tok = backend.tokenizer
    changed, done = [], 0
    while rows[done:] and len(changed) < MAX_SHOWN:
        batch = rows[done:done + MAX_SHOWN]
        done += len(batch)
        with _eval_mode(backend):
            answers = _answers(backend, [r["prompt_ids"] for r in batch], baseline["max_new_tokens"])
        for row, (ids, _) in zip(batch, answers):
            tuned = tok.decode(ids, skip_special_tokens=True).strip()
            if not _same_content(tuned, row["answer"]):
                changed.append({"id": row["id"], "prompt": row["prompt"], "base": row["answer"].strip(),
                                "tuned": tuned, "flagged": row["id"] in flagged})
    return changed[:MAX_SHOWN], done
