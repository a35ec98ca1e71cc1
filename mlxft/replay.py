"""Replay: the base model's own answers mixed into the training data so that they make up a
share `data.replay` of it, the measure that keeps retention above the floor while a model learns
(docs/retention.md).

A model with its own chat template answers a prompt set of its own (mlxft/probes/replay.jsonl,
disjoint from the retention probes, which replay would otherwise inflate); an answer cut off by
the token budget is trimmed to its last full sentence or dropped. A cut answer (trimmed, or cut
at its first sentence with data.replay_cut: first_sentence) trains its words but not the end of
its turn: the base model went on there. A base model continues general
passages instead (mlxft/text_replay.py). Either way the answers are generated once, side by side,
cached per model under MLXFT_HOME/retention/ (cached_generations), written to RUN/replay.jsonl
before training, and read back as samples by replay_samples.
"""

from __future__ import annotations

import json
import time

from mlxft.data import Sample
from mlxft.retention import (PROBES_DIR, CACHE_VERSION, _answers, _cache_dir, _eval_mode, _model_identity, _sha,
                             load_probes, own_chat_format, probe_prompt_ids, write_cache)

REPLAY_PROMPTS = PROBES_DIR / "replay.jsonl"
REPLAY_FILE = "replay.jsonl"
REPLAY_MAX_TOKENS = 80


def record_replay(cfg, run, backend, n_train: int) -> None:
    """Record the base model's replay answers (chat) or continuations (a base model's text) into
    RUN/replay.jsonl, as many as replay_samples will mix into `n_train` training samples. The
    backend must still behave as the base model (a fresh adapter)."""
    from mlxft import ui
    from mlxft.atomic import atomic_file

    if own_chat_format(backend):
        source, make, label, what = REPLAY_PROMPTS, replay_records, "replay", "answers to {} replay prompts"
    else:
        from mlxft.text_replay import TEXT_REPLAY_PASSAGES, continuation_records

        source, make, label, what = (TEXT_REPLAY_PASSAGES, continuation_records, "text replay",
                                     "continuations of {} replay passages")
    need = min(len(load_probes(source)), replay_count(cfg.data.replay, n_train))
    started = time.perf_counter()
    with ui.console.status(f"Recording the base model's {what.format(need)}"):
        records = make(cfg, run, backend, need)
    with atomic_file(run.path / REPLAY_FILE, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    ui.info(f"{label}: {len(records)} of {need} {what.split(' ')[0]} of the base model usable "
            f"({time.perf_counter() - started:.1f}s) -> {run.path / REPLAY_FILE}")


def replay_count(share: float, n_train: int) -> int:
    """Replay samples so that they are `share` of the mixed training set."""
    if share <= 0 or n_train <= 0:
        return 0
    return max(1, round(share * n_train / (1 - share)))


def _trim_to_sentence(text: str) -> str | None:
    cut = max(text.rfind(c) for c in ".!?")
    return text[: cut + 1].strip() if cut > 0 else None


def _first_sentence(text: str) -> str | None:
    ends = [i for i in (text.find(c) for c in ".!?") if i > 0]
    return text[: min(ends) + 1].strip() if ends else None


def cached_generations(cfg, run, backend, items: list[dict], system: str | None, kind: str,
                       max_tokens: int, until=None) -> list[dict]:
    """The base model's greedy answers to `items` (probe-file records), one dict per item:
    {"prompt_ids", "ids", "stopped"}. Answers are cached per item under MLXFT_HOME/retention/
    ({kind}-KEY.json, keyed by the model's identity), and only the missing ones are generated,
    side by side. The one cache of the base model's replay answers, chat and text alike.

    `until` (a name and a rule on the ids so far, mlxft.generate_until): end an answer as soon as
    the rule holds, e.g. at its first sentence end; such an answer is not `stopped` (the model did
    not end it) and has no end token."""

    ident = _model_identity(cfg, run, backend)
    key = _sha({**ident, "max": max_tokens, "kind": kind, "system": system, "v": CACHE_VERSION,
                **({"until": until[0]} if until else {})})[:24]
    path = _cache_dir() / f"{kind}-{key}.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    tok = backend.tokenizer
    keys = [f"{p['id']}:{_sha(p['prompt'])[:12]}" for p in items]
    missing = [(k, p) for k, p in zip(keys, items) if k not in cache]
    if missing:
        prompts = [probe_prompt_ids(tok, p, system) for _, p in missing]
        if until is None:
            with _eval_mode(backend):
                answers = _answers(backend, prompts, max_tokens)
        else:
            answers = _answers_until(backend, prompts, max_tokens, until[1])
        for (k, _), ids, (out, stopped) in zip(missing, prompts, answers):
            cache[k] = {"prompt_ids": ids, "ids": out, "stopped": stopped}
        write_cache(path, cache)
    return [cache[k] for k in keys]


def _answers_until(backend, prompts, max_tokens, rule) -> list[tuple[list[int], bool]]:
    from mlxft.generate_until import generate_until

    eos = backend.tokenizer.eos_token_id
    return [(ids + [eos] if end == "stop" and eos is not None else ids, end == "stop")
            for ids, end in generate_until(backend, prompts, max_tokens, rule)]


def first_sentence_rule(tokenizer):
    """("first_sentence", rule): the rule holds once the decoded answer holds a full sentence
    (the cut _first_sentence makes afterwards)."""
    return "first_sentence", lambda ids: _first_sentence(tokenizer.decode(ids, skip_special_tokens=True).strip()) is not None


def replay_records(cfg, run, backend, n: int) -> list[dict]:
    """The base model's answers to the first n replay prompts, as chat records; an answer cut off
    by the token budget is trimmed to its last full sentence (or dropped)."""
    tok = backend.tokenizer
    prompts = load_probes(REPLAY_PROMPTS)[:n]
    first = cfg.data.replay_cut == "first_sentence"
    cut = _first_sentence if first else (lambda text: text)
    gens = cached_generations(cfg, run, backend, prompts, cfg.data.system_prompt, "replay", REPLAY_MAX_TOKENS,
                              until=first_sentence_rule(tok) if first else None)
    records = []
    for p, gen in zip(prompts, gens):
        text = tok.decode(gen["ids"], skip_special_tokens=True).strip()
        answer = cut(text if gen["stopped"] else (_trim_to_sentence(text) or ""))
        if answer:
            # cut: the base went on after this answer, so its end-of-turn is not trained (replay_samples)
            records.append({"messages": [{"role": "user", "content": p["prompt"]},
                                         {"role": "assistant", "content": answer}], "id": p["id"],
                            "cut": not (gen["stopped"] and answer == text)})
    return records


def untrain_turn_end(tokenizer, sample: Sample) -> None:
    """Stop training the end of a cut answer's turn: the trailing target tokens that are special
    (end-of-turn) or blank. The base model did not end its answer there, and teaching it to would
    make its own longer answers less likely."""
    special = set(tokenizer.all_special_ids)
    for i in range(len(sample.ids) - 1, -1, -1):
        if not sample.targets[i]:
            continue
        if sample.ids[i] in special or not tokenizer.decode([sample.ids[i]]).strip():
            sample.targets[i] = False
        else:
            break


def replay_samples(cfg, run, tokenizer, n_train: int) -> list[Sample]:
    """Tokenized replay conversations making up a share data.replay of the training set (the
    recorded ones repeat when there are fewer than needed)."""
    from mlxft import ui
    from mlxft.data import tokenize_record

    path = run.path / REPLAY_FILE
    if not path.is_file():
        ui.warn(f"data.replay: {path} missing (the base model's answers were not recorded); training without replay")
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        return []
    want = replay_count(cfg.data.replay, n_train)
    out = []
    for i in range(want):
        rec = records[i % len(records)]
        if "completion_ids" in rec:  # a base model's continuation of a passage (mlxft.text_replay)
            from mlxft.text_replay import text_sample

            sample = text_sample(rec, cfg.train.max_seq_len)
            out.extend([sample] if sample is not None else [])
            continue
        s = tokenize_record(tokenizer, rec, "chat", cfg.train.mask_prompt, cfg.data.system_prompt)
        if rec.get("cut"):
            untrain_turn_end(tokenizer, s)
        s.ids, s.targets = s.ids[: cfg.train.max_seq_len], s.targets[: cfg.train.max_seq_len]
        if s.n_targets:
            s.source = f"replay:{rec.get('id', i)}"
            out.append(s)
    ui.info(f"replay: {len(out)} of the base model's own answers mixed into {n_train} training samples "
            f"(data.replay={cfg.data.replay})")
    return out
