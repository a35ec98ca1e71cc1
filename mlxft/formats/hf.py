"""Hugging Face datasets through the `datasets` library: `hf:NAME` (optionally `hf:NAME:SPLIT`)
loads a dataset already in the local datasets cache, and a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (optionally `FOLDER:SPLIT`) loads from disk. Offline by default: nothing is
downloaded unless HF_DATASETS_OFFLINE=0 is set. `data.split` picks the split (default "train")
and `data.limit` keeps the first N rows. Rows are numbered by their 0-based dataset index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from mlxft.errors import DataError

DEFAULT_SPLIT = "train"


def _is_saved_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_saved_dataset(path: Path) -> bool:
    """A folder written by save_to_disk (a Dataset: state.json, or a DatasetDict:
    dataset_dict.json), optionally followed by `:SPLIT`."""
    folder, _, split = str(path).rpartition(":")
    return _is_saved_folder(Path(path)) or bool(folder and split and _is_saved_folder(Path(folder)))


def cache_dir() -> Path:
    """The datasets cache, read from the environment at call time (datasets reads it once, at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _datasets():
    offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() not in ("0", "false", "no", "off")
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError("hf:", None, "Hugging Face datasets need the `datasets` package "
                        "(pip install 'mlxft[datasets]')") from None
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def parse_spec(spec: str, split: str | None) -> tuple[str, str | None]:
    """('NAME' or folder, split) from 'hf:NAME[:SPLIT]' or a folder path; data.split wins."""
    if spec.startswith("hf:"):
        name, _, suffix = spec[3:].partition(":")
        return name, split or suffix or None
    if not _is_saved_folder(Path(spec)):
        folder, _, suffix = spec.rpartition(":")
        return folder, split or suffix
    return spec, split


def load(spec: str, split: str | None):
    """The `datasets.Dataset` for one split of `spec`."""
    datasets = _datasets()
    name, split = parse_spec(spec, split)
    try:
        if not spec.startswith("hf:"):
            loaded = datasets.load_from_disk(name)
        else:
            if not name:
                raise DataError(spec, None, "expected hf:NAME (a dataset in the local Hugging Face cache)")
            loaded = datasets.load_dataset(name, split=split or DEFAULT_SPLIT, cache_dir=str(cache_dir()))
    except DataError:
        raise
    except (FileNotFoundError, ConnectionError) as exc:
        hint = ("not in the local Hugging Face datasets cache (offline by default: download it once with "
                "`datasets.load_dataset`, or set HF_DATASETS_OFFLINE=0)")
        raise DataError(spec, None, hint if spec.startswith("hf:") else f"cannot load ({exc})") from None
    except ValueError as exc:  # an unknown split, among others
        raise DataError(spec, None, ' '.join(str(exc).split())[:200]) from None
    if isinstance(loaded, datasets.DatasetDict):
        want = split or DEFAULT_SPLIT
        if want not in loaded:
            raise DataError(spec, None, f"no split '{want}' (splits: {', '.join(loaded)}); set data.split")
        loaded = loaded[want]
    elif split and not spec.startswith("hf:"):
        raise DataError(spec, None, f"is a single saved split; data.split={split!r} does not apply")
    return loaded


def read_hf(spec: str, split: str | None) -> Iterator[tuple[int, dict]]:
    """Rows in order; the caller stops reading at data.limit."""
    for index, row in enumerate(load(spec, split)):
        yield index, row
