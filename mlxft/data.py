"""Training data: records (read by mlxft/formats from JSONL, JSON, CSV, TSV, Parquet or Hugging
Face datasets) tokenized with prompt masking, split, grouped into batches by length so little
compute goes to padding, put in training order and dealt to data-parallel ranks.

Every source arrives as one of three canonical record formats:
    chat         {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
                  "tools": [...] (optional)}
    completions  {"prompt": "...", "completion": "..."}
    text         {"text": "..."}
Loss goes on every assistant turn (chat, tool calls included), on the completion (completions),
or on everything (text). With `mask_prompt: false` it goes on every token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.errors import DataError
from mlxft.formats import read_records, row_error
from mlxft.formats.records import RowError
from mlxft.templates import adds_bos


@dataclass
class Sample:
    ids: list[int]
    targets: list[bool]  # targets[i]: token i is predicted (from position i-1) and scored
    source: str = ""     # "file:line", for messages
    # Distillation targets (replay with data.replay_distill): row i holds the base model's top-k
    # tokens and their probabilities for token i, trained instead of the token itself; (len, k) each.
    soft: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.targets[1:])


@dataclass
class Batch:
    input_ids: np.ndarray       # (B, T) int64, padded with pad_id
    attention_mask: np.ndarray  # (B, T) 1 for real tokens
    loss_mask: np.ndarray       # (B, T) 1 where the token at t is a target predicted from t-1
    position_ids: np.ndarray | None = None  # packed batches restart positions per sample
    segment_ids: np.ndarray | None = None   # packed batches: which sample each token is from
    # (B, T, k) target tokens and their weights, when a member has soft targets: a plain member's
    # row t is its own token with weight 1 (the same loss as the hard target), so every target's
    # loss is -sum_j soft_p[t, j] log p(soft_ids[t, j]).
    soft_ids: np.ndarray | None = None
    soft_p: np.ndarray | None = None

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_slots(self) -> int:
        return int(self.input_ids.size)


@dataclass
class Dataset:
    samples: list[Sample]
    fmt: str
    path: str
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)
    # Aligned with samples, for `mlxft data check`: the canonical record, the length before
    # truncation, and whether truncation cut scored tokens (an answer that never ends).
    records: list[dict] = field(default_factory=list)
    full_lengths: list[int] = field(default_factory=list)
    cut: list[bool] = field(default_factory=list)
    shape: str = ""  # what the source held (alpaca, sharegpt, tools, ...), for reports

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------- reading


def read_jsonl(path: Path | str, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], str, list[str]]:
    """Parse and check a JSON Lines file. Returns ([(line_no, canonical record)], format, skipped)."""
    rs = read_records(path, skip_bad_lines=skip_bad_lines)
    return rs.rows, rs.fmt, rs.skipped


# ---------------------------------------------------------------------------- tokenizing


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **({"tools": tools} if tools else {}))


def supports_tools(tokenizer) -> bool:
    """Whether the model's chat template renders tool definitions and calls (it names `tools`, or
    ships a separate `tool_use` template)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in t for t in template.values() if isinstance(t, str))
    return isinstance(template, str) and "tools" in template


def tokenize_chat(tokenizer, messages: list[dict], mask_prompt: bool, tools: list[dict] | None = None) -> Sample:
    """Render with the chat template; mark the tokens of every assistant turn (content, tool calls
    and its end-of-turn marker) as targets. Spans come from rendering each prefix of the conversation."""
    full = render_chat(tokenizer, messages, tools=tools)
    spans = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:k], add_generation_prompt=True, tools=tools)
        through = full if k == len(messages) - 1 else render_chat(tokenizer, messages[: k + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(through.rstrip()):
            # Templates that rewrite earlier turns (rare): score the assistant content by search.
            start = full.find(msg["content"], spans[-1][1] if spans else 0) if msg["content"] else -1
            if start < 0:
                raise RowError("chat template output does not contain an assistant turn verbatim")
            spans.append((start, start + len(msg["content"])))
            continue
        spans.append((len(before), len(through.rstrip())))
    return _tokenize_with_spans(tokenizer, full, spans, mask_prompt)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets. A fast tokenizer's Rust backend is called directly: the
    same ids and offsets as tokenizer(...), without its per-call overhead (it dominates a data check)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), enc["offset_mapping"]


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]], mask_prompt: bool) -> Sample:
    ids, offsets = _encode(tokenizer, text)
    ids = list(ids)
    if not mask_prompt:
        return Sample(ids=ids, targets=[True] * len(ids))
    if not ids:
        return Sample(ids=ids, targets=[])
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mid = np.where(bounds[:, 1] > bounds[:, 0], bounds[:, 1] - 1, bounds[:, 0])  # a token's last character
    scored = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        scored |= (mid >= start) & (mid < end)
    return Sample(ids=ids, targets=scored.tolist())


def tokenize_record(tokenizer, record: dict, fmt: str, mask_prompt: bool, system_prompt: str | None = None) -> Sample:
    if fmt == "preference":  # SFT on a preference pair learns its prompt and chosen answer
        record, fmt = {"messages": record["prompt"] + record["chosen"]}, "chat"
    if fmt == "chat":
        messages = [dict(m) for m in record["messages"]]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        tools = record.get("tools")
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            if not supports_tools(tokenizer):
                raise RowError("tool calling needs a model whose chat template supports tools, and this "
                                 "model's does not (it never mentions 'tools'); pick one that does, e.g. "
                                 "Qwen2.5-*-Instruct or Llama-3.2-*-Instruct")
            return tokenize_chat(tokenizer, messages, mask_prompt, tools=tools)
        if not has_chat_template(tokenizer):  # training installs its choice first (mlxft.templates)
            from mlxft.templates import choose, install

            install(tokenizer, choose(tokenizer))
        return tokenize_chat(tokenizer, messages, mask_prompt)
    if fmt == "completions":
        if has_chat_template(tokenizer):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            return tokenize_chat(tokenizer, messages, mask_prompt)
        text = record["prompt"] + record["completion"]
        return _finish_plain(tokenizer, text, [(len(record["prompt"]), len(text))], mask_prompt)
    return _finish_plain(tokenizer, record["text"], [(0, len(record["text"]))], mask_prompt=False)


def _finish_plain(tokenizer, text: str, spans, mask_prompt: bool) -> Sample:
    """Plain text: BOS when the tokenizer wants one, EOS appended (and scored) so the model learns
    to stop."""
    sample = _tokenize_with_spans(tokenizer, text, spans, mask_prompt)
    if adds_bos(tokenizer):
        sample.ids.insert(0, tokenizer.bos_token_id)
        sample.targets.insert(0, False)
    if tokenizer.eos_token_id is not None:
        sample.ids.append(tokenizer.eos_token_id)
        sample.targets.append(True)
    return sample


def load_dataset(path: Path | str, tokenizer, max_seq_len: int, mask_prompt: bool = True,
                 system_prompt: str | None = None, skip_bad_lines: bool = False,
                 columns: dict[str, str] | None = None, split: str | None = None,
                 limit: int | None = None) -> Dataset:
    """Read any supported source (see mlxft/formats) and tokenize it. `columns`, `split` and
    `limit` are data.columns, data.split and data.limit."""
    rs = read_records(path, columns=columns, split=split, limit=limit, skip_bad_lines=skip_bad_lines)
    ds = Dataset(samples=[], fmt=rs.fmt, path=rs.path, skipped=rs.skipped, shape=rs.label)
    for loc, record in rs.rows:
        where = rs.where(loc)
        try:
            sample = tokenize_record(tokenizer, record, rs.fmt, mask_prompt, system_prompt)
        except RowError as exc:
            if not skip_bad_lines:
                raise row_error(rs.path, loc, rs.unit, str(exc)) from None
            ds.skipped.append(f"{where}: {exc}")
            continue
        full_len, cut = len(sample), any(sample.targets[max_seq_len:])
        if full_len > max_seq_len:
            sample.ids, sample.targets = sample.ids[:max_seq_len], sample.targets[:max_seq_len]
            ds.truncated += 1
        if sample.n_targets == 0:
            reason = "no tokens to learn from after truncation" if full_len > max_seq_len else "no tokens to learn from"
            if not skip_bad_lines:
                raise row_error(rs.path, loc, rs.unit, f"{reason} (max_seq_len={max_seq_len})")
            ds.skipped.append(f"{where}: {reason}")
            continue
        sample.source = where
        ds.samples.append(sample)
        ds.records.append(record)
        ds.full_lengths.append(full_len)
        ds.cut.append(cut)
    if not ds.samples:
        raise DataError(rs.path, None, "no usable samples")
    return ds


def held_out_split(n: int, share: float, seed: int, path: str, unit: str = "samples") -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of `n` items: a seeded share, at least one item on
    each side, both in file order. The one rule for SFT samples and preference pairs alike."""
    if n < 2:
        raise DataError(path, None, f"needs at least 2 {unit} to hold out a validation split (or give data.valid)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_valid = min(n - 1, max(1, round(n * share)))
    return sorted(order[n_valid:]), sorted(order[:n_valid])


def split_dataset(ds: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded share (at least one sample) for validation."""
    train, valid = held_out_split(len(ds), share, seed, ds.path)

    def part(indices, path, truncated=0, skipped=()):
        pick = lambda xs: [xs[i] for i in indices] if xs else []  # noqa: E731
        return Dataset(pick(ds.samples), ds.fmt, path, truncated, list(skipped), records=pick(ds.records),
                       full_lengths=pick(ds.full_lengths), cut=pick(ds.cut), shape=ds.shape)

    return part(train, ds.path, ds.truncated, ds.skipped), part(valid, ds.path + " (held out)")


# ---------------------------------------------------------------------------- batching


def collate(samples: list[Sample], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    length = max(len(s) for s in samples)
    if pad_to_multiple > 1:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    ids = np.full((len(samples), length), pad_id, dtype=np.int64)
    attn = np.zeros((len(samples), length), dtype=np.int64)
    mask = np.zeros((len(samples), length), dtype=np.int64)
    for i, s in enumerate(samples):
        n = len(s)
        ids[i, :n] = s.ids
        attn[i, :n] = 1
        mask[i, :n] = s.targets
    mask[:, 0] = 0
    soft_ids, soft_p = _soft_targets(samples, ids, [(i, 0) for i in range(len(samples))])
    return Batch(ids, attn, mask, soft_ids=soft_ids, soft_p=soft_p)


def _soft_targets(samples: list[Sample], ids: np.ndarray, places: list[tuple[int, int]]):
    """(soft_ids, soft_p) for a batch whose sample n sits at row places[n][0] from column
    places[n][1], or (None, None) when no sample has soft targets."""
    if all(s.soft is None for s in samples):
        return None, None
    k = max(s.soft[0].shape[1] for s in samples if s.soft is not None)
    soft_ids = np.zeros(ids.shape + (k,), dtype=np.int64)
    soft_p = np.zeros(ids.shape + (k,), dtype=np.float32)
    soft_ids[:, :, 0] = ids
    soft_p[:, :, 0] = 1.0
    for s, (row, at) in zip(samples, places):
        if s.soft is not None:
            top, p = s.soft
            soft_ids[row, at:at + len(s), :top.shape[1]] = top
            soft_p[row, at:at + len(s), :p.shape[1]] = p
            soft_p[row, at:at + len(s), p.shape[1]:] = 0.0
    return soft_ids, soft_p


def pack(samples: list[Sample], pad_id: int, max_len: int) -> Batch:
    """Pack samples into rows of at most max_len tokens (first fit, longest first). Position ids
    restart per sample and segment ids let the backend build a block-diagonal causal mask, so
    packed samples cannot see each other."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for s in sorted(samples, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(s) <= free:
                rows[i].append(s)
                room[i] -= len(s)
                break
        else:
            rows.append([s])
            room.append(max_len - len(s))
    length = max(max_len - r for r in room)
    shape = (len(rows), length)
    ids = np.full(shape, pad_id, dtype=np.int64)
    attn = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    pos = np.zeros(shape, dtype=np.int64)
    seg = np.zeros(shape, dtype=np.int64)
    places = []
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row, start=1):
            places.append((s, (r, at)))
            n = len(s)
            ids[r, at:at + n] = s.ids
            attn[r, at:at + n] = 1
            mask[r, at:at + n] = s.targets
            mask[r, at] = 0  # the first token of a sample is never predicted from the previous one
            pos[r, at:at + n] = np.arange(n)
            seg[r, at:at + n] = k
            at += n
    soft_ids, soft_p = _soft_targets([s for s, _ in places], ids, [p for _, p in places])
    return Batch(ids, attn, mask, position_ids=pos, segment_ids=seg, soft_ids=soft_ids, soft_p=soft_p)


def length_grouped_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of batches whose members have similar lengths. Samples are shuffled, cut into
    windows of 16 batches, sorted by length inside each window, batched, and the batch order
    shuffled: padding falls sharply while each epoch still sees a fresh order."""
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(samples[i]))
        batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class BatchOrder:
    """Training batches (sample indices) in order: length-grouped per epoch, a pure function of
    (seed, epoch), so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self._epoch: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, length_grouped_batches(self.samples, self.batch_size, self.seed, epoch))
        return self._epoch[1]

    def next(self, epoch: int, index: int) -> tuple[list[int], int, int]:
        """(the batch at cursor (epoch, index), the cursor after it)."""
        if index >= len(self.batches(epoch)):
            epoch, index = epoch + 1, 0
        return self.batches(epoch)[index], epoch, index + 1


def shard(samples: list[Sample], rank: int, size: int, pad_id: int, pack_to: int | None = None) -> Batch | None:
    """This rank's part of a global micro-batch (samples dealt round-robin), padded, or packed
    into rows of `pack_to` tokens; None when the rank gets no sample."""
    mine = samples[rank::size]
    if not mine:
        return None
    return pack(mine, pad_id, pack_to) if pack_to else collate(mine, pad_id)


def eval_batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Deterministic, length-sorted batches for validation."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
