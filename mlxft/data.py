"""Training data: JSONL in three formats (chat, completions, text), tokenized with prompt
masking, split, and grouped into batches by length so little compute goes to padding.

Formats, detected per file from the first valid line:
    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    completions  {"prompt": "...", "completion": "..."}
    text         {"text": "..."}
Loss goes on every assistant turn (chat), on the completion (completions), or on everything
(text). With `mask_prompt: false` it goes on every token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass
class Sample:
    ids: list[int]
    targets: list[bool]  # targets[i]: token i is predicted (from position i-1) and scored
    source: str = ""     # "file:line", for messages

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

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------- reading


def read_jsonl(path: Path | str, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], str, list[str]]:
    """Parse and validate a JSONL file. Returns ([(line_no, record)], format, skipped reasons)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a .jsonl file")
    if not path.exists():
        raise DataError(path, None, "file not found")
    records: list[tuple[int, dict]] = []
    skipped: list[str] = []
    fmt: str | None = None
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, f"cannot read ({exc.strerror})") from None
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                if len(raw) > MAX_LINE_BYTES:
                    raise _LineError(f"line is {len(raw) // (1024 * 1024)} MiB, over the {MAX_LINE_BYTES // (1024 * 1024)} MiB limit")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _LineError(f"not valid UTF-8 (byte {exc.start})") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise _LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                line_fmt = detect_format(record)
                if fmt is None:
                    fmt = line_fmt
                elif line_fmt != fmt:
                    raise _LineError(f"is {line_fmt} format but earlier lines are {fmt}")
                validate_record(record, line_fmt)
                records.append((line_no, record))
            except _LineError as exc:
                if not skip_bad_lines:
                    raise DataError(path, line_no, str(exc)) from None
                skipped.append(f"{path}:{line_no}: {exc}")
    if not records:
        raise DataError(path, None, "no usable samples (the file is empty" +
                        (f"; {len(skipped)} bad lines skipped)" if skipped else ")"))
    return records, fmt or "text", skipped


class _LineError(Exception):
    pass


def detect_format(record) -> str:
    if not isinstance(record, dict):
        raise _LineError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise _LineError(f"unknown format (keys: {keys}); expected 'messages', 'prompt'/'completion' or 'text'")


def _check_text(value, name: str) -> None:
    if not isinstance(value, str):
        raise _LineError(f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _LineError(f"'{name}' is empty")


def validate_record(record: dict, fmt: str) -> None:
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _LineError("'messages' must be a non-empty list")
        has_assistant = False
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise _LineError(f"messages[{i}] must be an object")
            if "role" not in msg:
                raise _LineError(f"messages[{i}] has no 'role'")
            if "content" not in msg:
                raise _LineError(f"messages[{i}] has no 'content'")
            if msg["role"] not in ROLES:
                raise _LineError(f"messages[{i}] has unknown role {msg['role']!r} (expected {', '.join(ROLES)})")
            _check_text(msg["content"], f"messages[{i}].content")
            has_assistant |= msg["role"] == "assistant"
        if not has_assistant:
            raise _LineError("conversation has no assistant turn to learn from")
    elif fmt == "completions":
        for key in ("prompt", "completion"):
            if key not in record:
                raise _LineError(f"missing field '{key}'")
            _check_text(record[key], key)
    else:
        _check_text(record["text"], "text")


# ---------------------------------------------------------------------------- tokenizing


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tokenizer, messages: list[dict], mask_prompt: bool) -> Sample:
    """Render with the chat template; mark the tokens of every assistant turn (content and its
    end-of-turn marker) as targets. Spans come from rendering each prefix of the conversation."""
    full = render_chat(tokenizer, messages)
    spans = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:k], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: k + 1])
        if not full.startswith(before) or not full.startswith(through.rstrip()):
            # Templates that rewrite earlier turns (rare): score the assistant content by search.
            start = full.find(msg["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise _LineError("chat template output does not contain an assistant turn verbatim")
            spans.append((start, start + len(msg["content"])))
            continue
        spans.append((len(before), len(through.rstrip())))
    return _tokenize_with_spans(tokenizer, full, spans, mask_prompt)


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]], mask_prompt: bool) -> Sample:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not mask_prompt:
        return Sample(ids=ids, targets=[True] * len(ids))
    targets = []
    for start, end in enc["offset_mapping"]:
        mid = start if end == start else end - 1
        targets.append(any(s <= mid < e for s, e in spans))
    return Sample(ids=ids, targets=targets)


def tokenize_record(tokenizer, record: dict, fmt: str, mask_prompt: bool, system_prompt: str | None = None) -> Sample:
    if fmt == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
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
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        sample.ids.insert(0, tokenizer.bos_token_id)
        sample.targets.insert(0, False)
    if tokenizer.eos_token_id is not None:
        sample.ids.append(tokenizer.eos_token_id)
        sample.targets.append(True)
    return sample


def load_dataset(path: Path | str, tokenizer, max_seq_len: int, mask_prompt: bool = True,
                 system_prompt: str | None = None, skip_bad_lines: bool = False) -> Dataset:
    records, fmt, skipped = read_jsonl(path, skip_bad_lines=skip_bad_lines)
    samples, truncated = [], 0
    for line_no, record in records:
        where = f"{path}:{line_no}"
        try:
            sample = tokenize_record(tokenizer, record, fmt, mask_prompt, system_prompt)
        except _LineError as exc:
            if not skip_bad_lines:
                raise DataError(path, line_no, str(exc)) from None
            skipped.append(f"{where}: {exc}")
            continue
        if len(sample) > max_seq_len:
            sample.ids, sample.targets = sample.ids[:max_seq_len], sample.targets[:max_seq_len]
            truncated += 1
        if sample.n_targets == 0:
            reason = "no tokens to learn from after truncation" if truncated else "no tokens to learn from"
            if not skip_bad_lines:
                raise DataError(path, line_no, f"{reason} (max_seq_len={max_seq_len})")
            skipped.append(f"{where}: {reason}")
            continue
        sample.source = where
        samples.append(sample)
    if not samples:
        raise DataError(path, None, "no usable samples")
    return Dataset(samples=samples, fmt=fmt, path=str(path), truncated=truncated, skipped=skipped)


def split_dataset(ds: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded share (at least one sample) for validation."""
    if len(ds) < 2:
        raise DataError(ds.path, None, "needs at least 2 samples to hold out a validation split "
                        "(or give data.valid)")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_valid = min(len(ds) - 1, max(1, round(len(ds) * share)))
    valid = [ds.samples[i] for i in sorted(order[:n_valid])]
    train = [ds.samples[i] for i in sorted(order[n_valid:])]
    return (Dataset(train, ds.fmt, ds.path, ds.truncated, ds.skipped),
            Dataset(valid, ds.fmt, ds.path + " (held out)"))


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
    return Batch(ids, attn, mask)


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
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row, start=1):
            n = len(s)
            ids[r, at:at + n] = s.ids
            attn[r, at:at + n] = 1
            mask[r, at:at + n] = s.targets
            mask[r, at] = 0  # the first token of a sample is never predicted from the previous one
            pos[r, at:at + n] = np.arange(n)
            seg[r, at:at + n] = k
            at += n
    return Batch(ids, attn, mask, position_ids=pos, segment_ids=seg)


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


def eval_batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Deterministic, length-sorted batches for validation."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
