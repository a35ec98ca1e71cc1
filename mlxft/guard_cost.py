"""What the forgetting guard cost in one run: the seconds spent on it and their share of the
whole `mlxft train`, for the `time:` line and the --json summary.

The guard's cost is what a run pays beyond the same run with retention.enabled=false and
data.replay=0: recording the base model's probe answers and replay answers (zero when cached),
reading the base model's distribution over the replay answers (data.replay_distill only),
scoring retention (at validations, and for the candidate adapters after training), regenerating
the chosen adapter's answers to the probes it no longer predicts top-1 throughout, and the
training steps replay adds. The first three are timed. The last is estimated from the run's own
figures, for an unguarded run stopping at the same step:

- steps beyond the unguarded run's budget (the planned steps times the user samples' share of
  the training set: replay adds steps so that the user's data is seen as often) count whole;
- the other steps count for their token surplus: a batch of the mixed set against one of user
  samples alone, 1 - (user tokens per sample) / (tokens per sample), from the samples as
  trained (a first-sentence replay answer counts with its own short length).

A step's cost grows with its tokens, and training batches are grouped by length
(mlxft.data.BatchOrder), so padding adds little to that approximation. The estimate cannot see
that the unguarded run may stop at another step; the benchmark (scripts/bench_forgetting.py)
measures both runs whole for that. Measured on the quickstart (docs/retention.md), charging
every replay token, as this did before, put the replay steps at 56 s when whole runs showed
the guard's whole cost at 13 to 40 s: the guarded run stopped about where the unguarded one did.
"""

from __future__ import annotations


def replay_steps_seconds(train_seconds: float, steps: int, total_steps: int, n_replay: int, n_all: int,
                         replay_tokens: int, all_tokens: int) -> float:
    """The estimate above: seconds of `steps` training steps that replay added."""
    if not (steps and n_all and all_tokens and n_replay):
        return 0.0
    per_step = train_seconds / steps
    budget = total_steps * (n_all - n_replay) / n_all
    beyond = max(0.0, steps - budget)
    user_tokens_per_sample = (all_tokens - replay_tokens) / max(1, n_all - n_replay)
    surplus = max(0.0, 1.0 - user_tokens_per_sample / (all_tokens / n_all))
    return per_step * (beyond + (steps - beyond) * surplus)


def guard_time(summary: dict, replay: list, samples: list, total_s: float) -> dict:
    timings = summary.get("timings") or {}
    all_tokens = sum(len(s) for s in samples)
    replay_tokens = sum(len(s) for s in replay)
    replay_share = replay_tokens / all_tokens if all_tokens else 0.0
    parts = {"baseline_and_replay_answers_s": timings.get("baseline_and_replay_s", 0.0),
             "replay_teacher_s": timings.get("replay_teacher_s", 0.0),
             "retention_scoring_s": timings.get("retention_s", 0.0),
             "changed_answers_s": (summary.get("retention") or {}).get("answers_s", 0.0),
             "replay_steps_s_estimated": replay_steps_seconds(
                 summary.get("train_seconds", 0.0), summary.get("steps", 0), summary.get("total_steps", 0),
                 len(replay), len(samples), replay_tokens, all_tokens)}
    seconds = sum(parts.values())
    return {"seconds": round(seconds, 2), "share": round(seconds / total_s, 4) if total_s > 0 else None,
            "total_s": round(total_s, 2), "replay_token_share": round(replay_share, 4),
            "retention_scored": summary.get("retention_scored"),
            "parts": {k: round(v, 2) for k, v in parts.items()}}
