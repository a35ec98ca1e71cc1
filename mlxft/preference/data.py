"""Preference pairs as training reads them: each answer rendered after its prompt by the model's
chat template, with only the answer's tokens (through its end-of-turn marker) scored, cut to
train.max_seq_len from the start; pairs batched as [chosen rows, rejected rows] in one batch,
as TRL's concatenated forward does.

The same pair file trains SFT too: with `train.method: sft` a pair is read as its prompt and
chosen answer (mlxft.data.tokenize_record), which is the SFT-on-chosen baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxft.data import Batch, Sample, _tokenize_with_spans, collate, has_chat_template, held_out_split, render_chat
from mlxft.errors import DataError
from mlxft.formats import read_records, row_error
from mlxft.formats.records import RowError


@dataclass
class Pair:
    chosen: Sample
    rejected: Sample
    source: str = ""

    def __len__(self) -> int:  # what length-grouped batching sorts by
        return max(len(self.chosen), len(self.rejected))

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets


@dataclass
class PairDataset:
    """Pairs, and for a training set the base model's replay answers (NLL-only samples, no
    rejected answer) mixed in after them: the trainer walks `samples`, pairs first."""
    pairs: list[Pair]
    path: str
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    cut: list[tuple[bool, bool]] = field(default_factory=list)  # (chosen, rejected) lost scored tokens
    fmt: str = "preference"
    replay: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:  # training items: pairs and replay samples
        return len(self.pairs) + len(self.replay)

    @property
    def samples(self) -> list[Pair | Sample]:  # the items the shared trainer walks, by index
        return self.pairs + self.replay


def prompt_messages(record: dict, system_prompt: str | None) -> list[dict]:
    messages = [dict(m) for m in record["prompt"]]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def tokenize_answer(tokenizer, prompt: list[dict], answer: list[dict]) -> Sample:
    """prompt + answer through the chat template; targets on the answer's tokens only."""
    if not has_chat_template(tokenizer):
        from mlxft.templates import choose, install

        install(tokenizer, choose(tokenizer))
    full = render_chat(tokenizer, prompt + answer)
    before = render_chat(tokenizer, prompt, add_generation_prompt=True)
    if not full.startswith(before):
        raise RowError("the chat template renders the prompt differently once an answer follows it")
    return _tokenize_with_spans(tokenizer, full, [(len(before), len(full.rstrip()))], mask_prompt=True)


def tokenize_pair(tokenizer, record: dict, system_prompt: str | None = None) -> tuple[Sample, Sample]:
    prompt = prompt_messages(record, system_prompt)
    return tokenize_answer(tokenizer, prompt, record["chosen"]), tokenize_answer(tokenizer, prompt, record["rejected"])


def _cut(sample: Sample, max_len: int) -> bool:
    """Truncate in place; whether scored tokens were lost."""
    lost = any(sample.targets[max_len:])
    sample.ids, sample.targets = sample.ids[:max_len], sample.targets[:max_len]
    return lost


def load_pairs(path, tokenizer, max_seq_len: int, system_prompt: str | None = None,
               skip_bad_lines: bool = False, columns: dict[str, str] | None = None,
               split: str | None = None, limit: int | None = None) -> PairDataset:
    """Read a preference source (any container mlxft.formats reads) and tokenize every pair."""
    rs = read_records(path, columns=columns, split=split, limit=limit, skip_bad_lines=skip_bad_lines)
    if rs.fmt != "preference":
        raise DataError(rs.path, None, f"holds {rs.shape} records, but train.method dpo/orpo needs preference "
                        "pairs ('prompt', 'chosen', 'rejected'; map other names with data.columns)")
    ds = PairDataset(pairs=[], path=rs.path, skipped=rs.skipped)
    for loc, record in rs.rows:
        where = rs.where(loc)
        try:
            chosen, rejected = tokenize_pair(tokenizer, record, system_prompt)
        except RowError as exc:
            if not skip_bad_lines:
                raise row_error(rs.path, loc, rs.unit, str(exc)) from None
            ds.skipped.append(f"{where}: {exc}")
            continue
        long = len(chosen) > max_seq_len or len(rejected) > max_seq_len
        cut = (_cut(chosen, max_seq_len), _cut(rejected, max_seq_len))
        ds.truncated += long
        if not chosen.n_targets or not rejected.n_targets:
            which = "chosen" if not chosen.n_targets else "rejected"
            reason = f"the {which} answer has no tokens left after truncation (max_seq_len={max_seq_len})"
            if not skip_bad_lines:
                raise row_error(rs.path, loc, rs.unit, reason)
            ds.skipped.append(f"{where}: {reason}")
            continue
        chosen.source = rejected.source = where
        ds.pairs.append(Pair(chosen, rejected, where))
        ds.records.append(record)
        ds.cut.append(cut)
    if not ds.pairs:
        raise DataError(rs.path, None, "no usable preference pairs")
    return ds


def split_pairs(ds: PairDataset, share: float, seed: int) -> tuple[PairDataset, PairDataset]:
    """Hold out a seeded share of the pairs (at least one) for validation."""
    train, valid = held_out_split(len(ds.pairs), share, seed, ds.path, unit="pairs")

    def part(indices, path, truncated=0, skipped=()):
        return PairDataset([ds.pairs[i] for i in indices], path, truncated, list(skipped),
                           records=[ds.records[i] for i in indices] if ds.records else [],
                           cut=[ds.cut[i] for i in indices] if ds.cut else [])

    return part(train, ds.path, ds.truncated, ds.skipped), part(valid, ds.path + " (held out)")


def collate_pairs(pairs: list[Pair], pad_id: int, replay: list[Sample] = ()) -> Batch:
    """One batch of 2n rows: the chosen answers, then the rejected ones in the same order (then
    the replay samples, one row each)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs] + list(replay), pad_id)
