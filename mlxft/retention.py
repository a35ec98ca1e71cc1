"""Retention (forgetting) check and replay: how far fine-tuning moved the model away from what
the base model said on everyday prompts, and a way to hold it close.

Probe set, written for mlxft; the first `retention.probes` are used:
- a model with its own chat template: mlxft/probes/general.jsonl, everyday questions (sent
  through the chat template) and short texts to continue (sent raw);
- a base model (no chat template of its own): mlxft/probes/passages.jsonl, short general
  passages in several domains (cooking, science, history, letters, stories, ...) to continue.

Before training (the adapter is freshly initialised, so the model is exactly the base model) the
base answers every probe greedily, the probes side by side in batches (at most `retention.max_new_tokens` tokens; its end-of-turn
token is kept when it stopped on its own), and the log-likelihood of that answer under the base
is measured with the same teacher-forced forward pass used afterwards. This baseline lands in
RUN/retention_baseline.json and is cached under MLXFT_HOME/retention/, keyed by base model
path (plus the starting adapter's hash), backend, dtype, device, system prompt, token budget and
the probes' text, so a repeat run does not regenerate it.

At the validations where it can change a decision (mlxft/guard_policy.py), and so for the
adapter finally chosen, the tuned model scores the same answers teacher-forced (one batched
forward pass, no generation). For probe i with n_i answer tokens:

    d_i   = (log p_tuned(answer_i) - log p_base(answer_i)) / n_i     (nats per token)
    r_i   = min(1, exp(d_i))       per-token likelihood ratio of the base's own answer, capped
    score = mean_i r_i

1.0: the tuned model is at least as likely as the base to say what the base said, on every
probe. 0.8: on average the per-token probability of the base's answer fell by a fifth. Also
reported: `agreement`, the share of answer tokens the tuned model still predicts top-1 given
the same prefix (the base itself scores ~1.0: its answers are its own greedy choices), and the
worst probes, and the probes whose answer changed (mlxft/probe_changes.py; the chosen adapter's
answers are regenerated at the end and the changed ones shown). The trainer keeps the best
adapter by validation whose score is at least `retention.floor` with at most
`retention.max_changed` changed probes (mlxft/guard_policy.py); below `retention.warn_below` a
warning with advice is printed.

Replay (`data.replay: r`, mlxft/replay.py and mlxft/text_replay.py): the base model's own
answers to a second, disjoint prompt set (a base model: its continuations of other passages),
added to the training data so they make up a share r of it. Replay is on by default (0.5):
it is what kept retention above the floor while learning in the measurements
(docs/retention.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

from mlxft.data import Sample, collate

PROBES_DIR = Path(__file__).resolve().parent / "probes"
GENERAL_PROBES = PROBES_DIR / "general.jsonl"
PASSAGES = PROBES_DIR / "passages.jsonl"  # base models: general text to continue, several domains
BASELINE_FILE = "retention_baseline.json"
CACHE_VERSION = 2
SCORE_BATCH = 16  # probe answers scored per forward pass

def advice(cfg) -> str:
    replay = (f"raise data.replay (now {cfg.data.replay:g}) to mix in more of the base model's own answers"
              if cfg.data.replay > 0 else "mix in the base model's own answers with data.replay: 0.2")
    return ("to keep more of the base model: raise retention.floor (the kept adapter must reach it), "
            f"lower lora.rank or train.learning_rate, or {replay}")


# ---------------------------------------------------------------------------- probe files


def load_probes(path: Path = GENERAL_PROBES, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


def own_chat_format(backend) -> bool:
    """Whether the model brought its own chat template (an instruction-tuned model). A base model
    gets mlxft's fallback template (mlxft.templates); its answers to chats are not worth keeping."""
    setup = getattr(backend, "chat_setup", None)
    return setup is None or setup.source == "model"


def probe_set(cfg, backend) -> list[dict]:
    """The probes a run is scored on: everyday questions and texts for a model with its own chat
    format; for a base model general passages to continue (mlxft/probes/passages.jsonl), since
    how it answers chats is what training changes."""
    probes = load_probes() if own_chat_format(backend) else load_probes(PASSAGES)
    return probes[:cfg.retention.probes]


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    from mlxft.paths import home

    return home() / "retention"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".npz")


def _weights_stamp(model_path) -> list:
    """Name, size and modification time of each weight file in the model folder, so a model
    rewritten in place (a re-pull, a fuse over the same folder) gets a fresh baseline. Hashing
    the bytes would cost seconds per gigabyte on every run; size and mtime are what make and
    Python's bytecode cache trust too."""
    folder = Path(model_path) if model_path else None
    if folder is None or not folder.is_dir():
        return []
    stamp = []
    for f in sorted(folder.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES and f.is_file():
            st = f.stat()
            stamp.append([f.name, st.st_size, st.st_mtime_ns])
    return stamp


def _model_identity(cfg, run, backend) -> dict:
    """What the 'base' of this run is: its model path and the state of its weight files, plus the
    starting adapter when training continues from another run."""
    from mlxft.runs import Run, is_run_dir

    meta = run.meta()
    setup = getattr(backend, "chat_setup", None)
    ident = {"model_path": meta.get("model_path"), "weights": _weights_stamp(meta.get("model_path")),
             "backend": backend.name, "dtype": backend.dtype_name(),
             "device": backend.device_name(), "system_prompt": cfg.data.system_prompt,
             "chat_template": _sha(setup.template)[:16] if setup is not None else None}
    if cfg.model and is_run_dir(cfg.model):
        try:
            adapter = Run(Path(cfg.model)).adapter()
            ident["start_adapter"] = _file_sha(adapter / "adapter_model.safetensors")
        except Exception:
            ident["start_adapter"] = str(cfg.model)
    return ident


@contextlib.contextmanager
def _eval_mode(backend):
    """Generate in eval mode (no dropout), then put the model back in the mode it was in: a
    training backend must leave this block still training."""
    model = getattr(backend, "model", None)
    was = getattr(model, "training", None)
    if was is not None and hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was is not None and hasattr(model, "train"):
            model.train(was)


# ---------------------------------------------------------------------------- prompts and scoring


def probe_prompt_ids(tokenizer, probe: dict, system: str | None) -> list[int]:
    from mlxft.templates import format_prompt

    return format_prompt(tokenizer, probe["prompt"], raw=probe.get("kind") == "text", system=system)


def _answers(backend, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], bool]]:
    """Greedy answers, generated side by side, and whether each stopped on its own (then its
    end token is appended, as the model would have produced it)."""
    eos = backend.tokenizer.eos_token_id
    out = []
    for ids in backend.generate_batch(prompts, max_tokens, temperature=0.0):
        stopped = len(ids) < max_tokens
        out.append((ids + [eos] if stopped and eos is not None else ids, stopped))
    return out


def score_answers(backend, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, int, int]]:
    """(log-likelihood, tokens, top-1 agreements) of each answer after its prompt, teacher-forced,
    SCORE_BATCH answers per forward pass."""
    out = []
    pad = backend.tokenizer.pad_token_id
    for start in range(0, len(items), SCORE_BATCH):
        samples = [Sample(ids=list(p) + list(a), targets=[False] * len(p) + [True] * len(a))
                   for p, a in items[start:start + SCORE_BATCH]]
        out.extend((-r.loss_sum, r.n_targets, r.n_correct) for r in backend.row_scores(collate(samples, pad)))
    return out


def build_baseline(cfg, backend) -> dict:
    """Generate and score the base model's answers to the probes."""
    probes = probe_set(cfg, backend)
    tok = backend.tokenizer
    rows = []
    with _eval_mode(backend):
        prompts = [probe_prompt_ids(tok, p, cfg.data.system_prompt) for p in probes]
        answered = [(p, ids, a, stopped) for p, ids, (a, stopped)
                    in zip(probes, prompts, _answers(backend, prompts, cfg.retention.max_new_tokens)) if a]
        scores = score_answers(backend, [(ids, a) for _, ids, a, _ in answered])
        for (p, prompt_ids, answer_ids, stopped), (lp, n, correct) in zip(answered, scores):
            rows.append({"id": p["id"], "kind": p.get("kind", "chat"), "prompt": p["prompt"],
                         "answer": tok.decode(answer_ids, skip_special_tokens=True), "stopped": stopped,
                         "prompt_ids": prompt_ids, "answer_ids": answer_ids, "logprob": lp, "tokens": n,
                         "agreement": correct / max(n, 1)})
    return {"version": CACHE_VERSION, "max_new_tokens": cfg.retention.max_new_tokens, "probes": rows}


def _cached_json(path: Path, build):
    if path.is_file():
        try:
            return json.loads(path.read_text()), True
        except (OSError, json.JSONDecodeError):
            pass
    data = build()
    write_cache(path, data)
    return data, False


def write_cache(path: Path, data) -> None:
    """Write a JSON cache file whole (temporary name, then rename); a cache that cannot be
    written (read-only MLXFT_HOME, full disk) only costs time on the next run."""
    from mlxft.atomic import atomic_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass


def compare(baseline: dict, scored: list[tuple[float, int, int]]) -> dict:
    """The retention figures from a baseline and the tuned model's scores of the same answers."""
    from mlxft.probe_changes import is_changed

    ratios, deltas, per_probe, changed, diverged = [], [], [], [], []
    agree = total = 0
    for row, (lp, n, correct) in zip(baseline["probes"], scored):
        d = (lp - row["logprob"]) / max(n, 1)
        r = min(1.0, math.exp(min(d, 0.0)))
        ratios.append(r)
        deltas.append(d)
        agree += correct
        total += n
        per_probe.append({"id": row["id"], "prompt": row["prompt"], "ratio": round(r, 4),
                          "nats_per_token": round(d, 4)})
        if is_changed(row, lp, n, correct):
            changed.append(row["id"])
        if correct < n:
            diverged.append(row["id"])
    if not ratios:
        return {"score": None, "reason": "no probes"}
    worst = sorted(per_probe, key=lambda p: p["ratio"])[:3]
    return {"score": sum(ratios) / len(ratios), "agreement": agree / max(total, 1),
            "nats_per_token": sum(deltas) / len(deltas), "probes": len(ratios),
            "base_agreement": sum(r["agreement"] * r["tokens"] for r in baseline["probes"]) / max(total, 1),
            "worst": worst, "changed": len(changed), "changed_ids": changed, "diverged_ids": diverged}


# ---------------------------------------------------------------------------- pipeline hooks


def before_training(cfg, run, backend, n_train: int = 0) -> None:
    """Record the base model's probe answers (RUN/retention_baseline.json) and, with data.replay,
    its answers to the replay prompts (RUN/replay.jsonl), as many as replay_samples will mix into
    `n_train` training samples. The backend must still behave as the base model (a fresh adapter)."""
    from mlxft import ui

    ident = _model_identity(cfg, run, backend)
    if cfg.retention.enabled and cfg.retention.probes > 0:
        probes = probe_set(cfg, backend)
        key = _sha({**ident, "probes": probes, "max_new_tokens": cfg.retention.max_new_tokens,
                    "v": CACHE_VERSION})[:24]
        started = time.perf_counter()
        with ui.console.status(f"Recording the base model's answers to {len(probes)} retention probes"):
            baseline, cached = _cached_json(_cache_dir() / f"baseline-{key}.json",
                                            lambda: build_baseline(cfg, backend))
        baseline["identity"] = ident
        (run.path / BASELINE_FILE).write_text(json.dumps(baseline, indent=1))
        how = "cached" if cached else f"{time.perf_counter() - started:.1f}s"
        ui.info(f"retention baseline: {len(baseline['probes'])} probes ({how}) -> {run.path / BASELINE_FILE}")
    if cfg.data.replay > 0:
        from mlxft.replay import record_replay

        record_replay(cfg, run, backend, n_train)


def tracker(run, backend):
    """A callable scoring the backend's current adapter against the run's baseline (the trainer
    calls it where retention.score_at asks: at validations, and for candidate adapters after
    training), or None when the run has no baseline."""
    path = run.path / BASELINE_FILE
    if not path.is_file():
        return None
    baseline = json.loads(path.read_text())
    items = [(r["prompt_ids"], r["answer_ids"]) for r in baseline["probes"]]
    if not items:
        return None

    def score() -> dict:
        with _eval_mode(backend):
            return compare(baseline, score_answers(backend, items))

    return score


def score_run(cfg, run, backend) -> dict:
    """Score the backend's current model against the run's baseline."""
    score = tracker(run, backend)
    return score() if score is not None else {"score": None, "reason": f"no {BASELINE_FILE} in the run"}


def after_training(cfg, run, summary: dict, backend=None) -> dict:
    """Retention of the adapter the trainer chose (scored at its validation), with a warning
    below retention.warn_below, and (given the backend) the probes whose answer the chosen
    adapter changed (mlxft.probe_changes). The result goes into run.json and the summary."""
    from mlxft import ui

    if not cfg.retention.enabled:
        return {"score": None, "reason": "retention.enabled is false"}
    chosen = summary.get("chosen_retention")
    if not chosen or chosen.get("score") is None:
        return {"score": None, "reason": f"no {BASELINE_FILE} in the run or no validation ran"}
    result = dict(chosen, adapter=f"step {summary.get('chosen_step')}", floor=cfg.retention.floor,
                  warn_below=cfg.retention.warn_below)
    score = result["score"]
    ui.info(f"retention: {score:.3f} (probe answers of the base model; top-1 agreement "
            f"{result['agreement']:.3f}, {result['nats_per_token']:+.3f} nats/token, adapter of {result['adapter']})")
    if backend is not None:
        _add_changed_answers(cfg, run, backend, summary, result)
    if score < cfg.retention.warn_below:
        result["warning"] = (f"retention {score:.3f} is below retention.warn_below={cfg.retention.warn_below}: "
                             f"the tuned model drifted from the base model on everyday prompts; {advice(cfg)}")
        ui.warn(result["warning"])
    return result


def _add_changed_answers(cfg, run, backend, summary: dict, result: dict) -> None:
    from mlxft import ui
    from mlxft.probe_changes import chosen_answers

    started = time.perf_counter()
    baseline = json.loads((run.path / BASELINE_FILE).read_text())
    diverged = result.get("diverged_ids")
    regenerated = 0
    try:
        result["answers_changed"], regenerated = chosen_answers(cfg, run, backend, summary, baseline,
                                                                set(result.get("changed_ids") or []),
                                                                None if diverged is None else set(diverged))
    except NotImplementedError as exc:
        result["answers_changed_reason"] = str(exc)
    result["answers_s"] = round(time.perf_counter() - started, 2)
    result["answers_regenerated"] = regenerated
    may_differ = len(baseline["probes"]) if diverged is None else len(diverged)
    ui.info(f"retention: {result.get('changed', 0)} of {len(baseline['probes'])} probe answers changed "
            f"(retention.max_changed={cfg.retention.max_changed}); the chosen adapter answered {regenerated} of "
            f"the {may_differ} probes it no longer predicts top-1 throughout again, flagged first, "
            f"in {result['answers_s']:.1f}s")
