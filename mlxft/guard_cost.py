"""What the forgetting guard cost in one run: the seconds spent on it and their share of the
whole `mlxft train`, for the `time:` line and the --json summary.

The guard's cost is what a run pays beyond the same run with retention.enabled=false and
data.replay=0: recording the base model's probe answers and replay answers (zero when cached),
scoring retention at validations, regenerating the chosen adapter's answers to the probes it no
longer predicts top-1 throughout, and the training steps spent on replay samples. The first
three are timed. The last is estimated: the steps' time times the replay samples' share of the
training set's tokens, as trained (a first-sentence replay answer counts with its own short
length). A step's cost grows with its tokens, and training batches are grouped by length
(mlxft.data.BatchOrder), so padding adds little to that approximation. The estimate does not see
that the guarded run may stop at another step than the unguarded one would; the benchmark
(scripts/bench_forgetting.py) measures both runs whole for that.
"""

from __future__ import annotations


def guard_time(summary: dict, replay: list, samples: list, total_s: float) -> dict:
    timings = summary.get("timings") or {}
    all_tokens = sum(len(s) for s in samples)
    replay_share = sum(len(s) for s in replay) / all_tokens if all_tokens else 0.0
    parts = {"baseline_and_replay_answers_s": timings.get("baseline_and_replay_s", 0.0),
             "retention_scoring_s": timings.get("retention_s", 0.0),
             "changed_answers_s": (summary.get("retention") or {}).get("answers_s", 0.0),
             "replay_steps_s_estimated": summary.get("train_seconds", 0.0) * replay_share}
    seconds = sum(parts.values())
    return {"seconds": round(seconds, 2), "share": round(seconds / total_s, 4) if total_s > 0 else None,
            "total_s": round(total_s, 2), "replay_token_share": round(replay_share, 4),
            "retention_scored": summary.get("retention_scored"),
            "parts": {k: round(v, 2) for k, v in parts.items()}}
