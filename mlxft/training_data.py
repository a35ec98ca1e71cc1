"""The data as training read it: the one reader behind train, eval, data check, the export
self-check and replay sizing, so that none of them can drift from what the trainer saw.

It takes a run (its folder, or a `Run`) or a `Config`, and applies the recipe's data keys as
training does:

    data.train   read with data.columns, data.split and data.limit
    data.valid   read with data.columns and data.limit (data.split names a split of data.train)
    neither      when there is no data.valid, a seeded share data.valid_split of the *tokenized*
                 training samples is held out (rows dropped by --skip-bad-lines or truncation are
                 gone before the split, so every consumer holds out the same samples)

A mapping in data.columns applies only to the sources that need it (see mlxft/formats).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlxft.config import Config
from mlxft.data import Dataset, load_dataset, split_dataset
from mlxft.errors import ConfigError
from mlxft.runs import Run


def config_of(source: Run | Config | Path | str) -> Config:
    """The config of a run (its config.yaml, read through the run object) or the config itself."""
    if isinstance(source, Config):
        return source
    return (source if isinstance(source, Run) else Run(Path(source))).config()


def read_source(source: Run | Config | Path | str, spec: str, tokenizer, *, train: bool,
                skip_bad_lines: bool = False, max_seq_len: int | None = None, own: bool = True) -> Dataset:
    """One data source read with the config's settings; `train` says whether it plays the part of
    data.train (data.split applies) or of a validation file (it does not). `own=False` is a file
    the user names beside the recipe (`mlxft eval RUN --data FILE`): data.columns applies where
    the file needs it, data.limit (a cap on the recipe's own sources) does not."""
    cfg = config_of(source)
    return load_dataset(spec, tokenizer, max_seq_len=max_seq_len or cfg.train.max_seq_len,
                        mask_prompt=cfg.train.mask_prompt, system_prompt=cfg.data.system_prompt,
                        skip_bad_lines=skip_bad_lines, columns=cfg.data.columns, limit=cfg.data.limit if own else None,
                        split=cfg.data.split if train else None)


def training_sets(source: Run | Config | Path | str, tokenizer, *,
                  skip_bad_lines: bool = False) -> tuple[Dataset, Dataset]:
    """(train, valid) exactly as the trainer uses them."""
    cfg = config_of(source)
    if not cfg.data.train:
        raise ConfigError("data.train: no training data", "pass --data FILE or set data.train in the recipe")
    train = read_source(cfg, cfg.data.train, tokenizer, train=True, skip_bad_lines=skip_bad_lines)
    if cfg.data.valid:
        return train, read_source(cfg, cfg.data.valid, tokenizer, train=False, skip_bad_lines=skip_bad_lines)
    return split_dataset(train, cfg.data.valid_split, cfg.seed)


def validation_set(source: Run | Config | Path | str, tokenizer, *, skip_bad_lines: bool = False,
                   max_seq_len: int | None = None) -> Dataset:
    """The validation samples training scored: data.valid, or the held-out share of data.train.
    At another `max_seq_len` the held-out samples are the same ones (chosen at the run's
    train.max_seq_len), each read again at the new length."""
    cfg = config_of(source)
    if cfg.data.valid:
        return read_source(cfg, cfg.data.valid, tokenizer, train=False, skip_bad_lines=skip_bad_lines,
                           max_seq_len=max_seq_len)
    _, valid = training_sets(cfg, tokenizer, skip_bad_lines=skip_bad_lines)
    if not max_seq_len or max_seq_len == cfg.train.max_seq_len:
        return valid
    held = {s.source for s in valid.samples}  # "file:line" / "file: row N"

    def read(limit: int) -> Dataset:
        return read_source(cfg, cfg.data.train, tokenizer, train=True, skip_bad_lines=skip_bad_lines,
                           max_seq_len=limit)

    def keep(ds: Dataset) -> list:
        return [s for s in ds.samples if s.source in held]

    whole = keep(read(sys.maxsize))
    return Dataset(keep(read(max_seq_len)), valid.fmt, valid.path,
                   truncated=sum(len(s) > max_seq_len for s in whole))


def validation_records(source: Run | Config | Path | str, tokenizer) -> list[dict]:
    """The canonical records of the validation samples training scored (for the export
    self-check). Empty when the run's data files are gone or unreadable."""
    from mlxft.errors import MlxftError

    try:
        return list(validation_set(source, tokenizer, skip_bad_lines=True).records)
    except (MlxftError, OSError):
        return []
