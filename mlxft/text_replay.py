"""Text replay for base models: the base model's own continuations of general passages, mixed
into the training data as text samples, so that learning a chat format does not wash out how
the model continues ordinary text.

A base model (no chat template of its own) has no chat answers worth replaying; what it knows
shows in how it continues text. Before training, the base continues the passages in
mlxft/probes/passages_replay.jsonl greedily (side by side, at most REPLAY_MAX_TOKENS tokens),
each continuation is cut at its last full sentence (with data.replay_cut: first_sentence,
generation stops at its first sentence end, mlxft.generate_until), and the pair (passage, continuation) becomes a sample whose targets are the
continuation's tokens, exactly the ids the base produced (no decode/re-encode round trip). The
retention passages (mlxft/probes/passages.jsonl) are a disjoint set, so replay cannot inflate
the retention score. The continuations are cached under MLXFT_HOME/retention/ like the chat
replay answers (mlxft.retention), and written to RUN/replay.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from mlxft.data import Sample

TEXT_REPLAY_PASSAGES = Path(__file__).resolve().parent / "probes" / "passages_replay.jsonl"
REPLAY_MAX_TOKENS = 48
SENTENCE_ENDS = (".", "!", "?")


def sentence_cut(tokenizer, ids: list[int], first: bool = False) -> list[int]:
    """The longest prefix of `ids` that ends a sentence (the shortest with first=True); [] when
    none does. Cut on token boundaries, so the kept ids are exactly what the model produced."""
    ends = [i for i in range(1, len(ids) + 1) if ends_sentence(tokenizer, ids[:i])]
    if not ends:
        return []
    return list(ids[:ends[0] if first else ends[-1]])


def ends_sentence(tokenizer, ids: list[int]) -> bool:
    return bool(ids) and tokenizer.decode(ids, skip_special_tokens=True).rstrip().endswith(SENTENCE_ENDS)


def continuation_records(cfg, run, backend, n: int) -> list[dict]:
    """The base model's continuations of the first n replay passages, as records holding the
    prompt and continuation ids (cached per passage)."""
    from mlxft.replay import cached_generations
    from mlxft.retention import load_probes

    tok = backend.tokenizer
    passages = load_probes(TEXT_REPLAY_PASSAGES)[:n]
    first = cfg.data.replay_cut == "first_sentence"
    eos = tok.eos_token_id
    until = ("first_sentence", lambda ids: ends_sentence(tok, ids)) if first else None
    gens = cached_generations(cfg, run, backend, passages, None, "text-replay", REPLAY_MAX_TOKENS, until=until)
    records = []
    for p, gen in zip(passages, gens):
        kept = sentence_cut(tok, [t for t in gen["ids"] if t != eos], first=first)
        if kept:
            records.append({"id": p["id"], "kind": "text", "prompt": p["prompt"],
                            "completion": tok.decode(kept, skip_special_tokens=True),
                            "prompt_ids": gen["prompt_ids"], "completion_ids": kept})
    return records


def text_sample(record: dict, max_len: int) -> Sample | None:
    """A replay record as a training sample: the passage as context, its continuation as targets."""
    prompt, completion = record["prompt_ids"], record["completion_ids"]
    ids = (list(prompt) + list(completion))[:max_len]
    targets = ([False] * len(prompt) + [True] * len(completion))[:max_len]
    sample = Sample(ids=ids, targets=targets, source=f"replay:{record.get('id', '')}")
    return sample if sample.n_targets else None
