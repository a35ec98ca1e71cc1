"""Text replay for base models: the base model's own continuations of general passages, mixed
into the training data as text samples, so that learning a chat format does not wash out how
the model continues ordinary text.

A base model (no chat template of its own) has no chat answers worth replaying; what it knows
shows in how it continues text. Before training, the base continues the passages in
mlxft/probes/passages_replay.jsonl greedily (side by side, at most REPLAY_MAX_TOKENS tokens),
each continuation is cut at its last full sentence (or its first, with data.replay_cut:
first_sentence), and the pair (passage, continuation) becomes a sample whose targets are the
continuation's tokens, exactly the ids the base produced (no decode/re-encode round trip). The
retention passages (mlxft/probes/passages.jsonl) are a disjoint set, so replay cannot inflate
the retention score. The continuations are cached under MLXFT_HOME/retention/ like the chat
replay answers (mlxft.retention), and written to RUN/replay.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.data import Sample

TEXT_REPLAY_PASSAGES = Path(__file__).resolve().parent / "probes" / "passages_replay.jsonl"
REPLAY_MAX_TOKENS = 48
CACHE_VERSION = 1
SENTENCE_ENDS = (".", "!", "?")


def sentence_cut(tokenizer, ids: list[int], first: bool = False) -> list[int]:
    """The longest prefix of `ids` that ends a sentence (the shortest with first=True); [] when
    none does. Cut on token boundaries, so the kept ids are exactly what the model produced."""
    ends = [i for i in range(1, len(ids) + 1)
            if tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip().endswith(SENTENCE_ENDS)]
    if not ends:
        return []
    return list(ids[:ends[0] if first else ends[-1]])


def continuation_records(cfg, run, backend, n: int) -> list[dict]:
    """The base model's continuations of the first n replay passages, as records holding the
    prompt and continuation ids (cached per passage)."""
    from mlxft.atomic import atomic_file
    from mlxft.retention import _answers, _cache_dir, _eval_mode, _model_identity, _sha, load_probes, \
        probe_prompt_ids

    ident = _model_identity(cfg, run, backend)
    key = _sha({**ident, "max": REPLAY_MAX_TOKENS, "kind": "text", "v": CACHE_VERSION})[:24]
    path = _cache_dir() / f"text-replay-{key}.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    tok = backend.tokenizer
    passages = load_probes(TEXT_REPLAY_PASSAGES)[:n]
    keys = [f"{p['id']}:{_sha(p['prompt'])[:12]}" for p in passages]
    missing = [(k, p) for k, p in zip(keys, passages) if k not in cache]
    if missing:
        prompts = [probe_prompt_ids(tok, p, None) for _, p in missing]
        with _eval_mode(backend):
            answers = _answers(backend, prompts, REPLAY_MAX_TOKENS)
        eos = tok.eos_token_id
        for (k, _), ids, (out, stopped) in zip(missing, prompts, answers):
            body = [t for t in out if t != eos]
            cache[k] = {"prompt_ids": ids, "ids": body, "stopped": stopped}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "w") as fh:
                json.dump(cache, fh)
        except OSError:
            pass  # a read-only cache only costs time
    first = cfg.data.replay_cut == "first_sentence"
    records = []
    for k, p in zip(keys, passages):
        kept = sentence_cut(tok, cache[k]["ids"], first=first)
        if kept:
            records.append({"id": p["id"], "kind": "text", "prompt": p["prompt"],
                            "completion": tok.decode(kept, skip_special_tokens=True),
                            "prompt_ids": cache[k]["prompt_ids"], "completion_ids": kept})
    return records


def text_sample(record: dict, max_len: int) -> Sample | None:
    """A replay record as a training sample: the passage as context, its continuation as targets."""
    prompt, completion = record["prompt_ids"], record["completion_ids"]
    ids = (list(prompt) + list(completion))[:max_len]
    targets = ([False] * len(prompt) + [True] * len(completion))[:max_len]
    sample = Sample(ids=ids, targets=targets, source=f"replay:{record.get('id', '')}")
    return sample if sample.n_targets else None
