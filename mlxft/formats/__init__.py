"""Reading training data from any supported source into checked, canonical records.

Sources: JSON Lines (.jsonl, or .json holding one JSON array), CSV (.csv), TSV (.tsv), Parquet
(.parquet), and Hugging Face datasets (`hf:NAME` from the local cache, or a folder written by
`Dataset.save_to_disk`). The record shape (chat, tools, sharegpt, alpaca, completions, text) is
detected per file from the first usable row; see mlxft/formats/records.py. A `data.columns`
mapping applies to the sources that need it, judged on their first row: a source whose first
row has none of the mapped columns and is already in a known shape is read as that shape. A bad row fails with
one line naming the file, the line (or row) and the reason, unless skip_bad_lines is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mlxft.errors import DataError
from mlxft.formats.records import CANONICAL, RowError, detect_shape, needs_mapping, rename_columns, to_canonical


@dataclass
class RecordSet:
    rows: list[tuple[int, dict]]  # (line or row number, canonical record)
    fmt: str                      # chat | completions | text: what the tokenizer sees
    shape: str                    # chat | tools | sharegpt | alpaca | completions | text: what the file holds
    container: str                # jsonl | json | csv | tsv | parquet | hf
    path: str
    unit: str = "line"            # "line" (text files) or "row" (0-based Parquet / dataset index)
    skipped: list[str] = field(default_factory=list)

    def where(self, loc: int) -> str:
        return where(self.path, loc, self.unit)

    @property
    def label(self) -> str:
        return self.shape if self.container in ("jsonl", "json") else f"{self.shape} ({self.container})"


def where(path: str, loc: int | None, unit: str) -> str:
    if loc is None:
        return str(path)
    return f"{path}:{loc}" if unit == "line" else f"{path}: row {loc}"


def row_error(path, loc: int | None, unit: str, reason: str) -> DataError:
    if unit == "line" or loc is None:
        return DataError(path, loc, reason)
    return DataError(path, None, f"row {loc}: {reason}")


def is_hf_source(spec: str) -> bool:
    from mlxft.formats.hf import is_saved_dataset

    return str(spec).startswith("hf:") or is_saved_dataset(Path(spec))


def read_records(spec: str | Path, *, columns: dict[str, str] | None = None, split: str | None = None,
                 limit: int | None = None, skip_bad_lines: bool = False) -> RecordSet:
    """Read, check and canonicalize every record of one data source."""
    spec = str(spec)
    if is_hf_source(spec):
        from mlxft.formats.hf import read_hf

        raw, container, unit, label = read_hf(spec, split), "hf", "row", spec
    else:
        path = Path(spec)
        if path.is_dir():
            raise DataError(path, None, "is a directory, expected a data file or a saved Hugging Face dataset")
        if not path.exists():
            raise DataError(path, None, "file not found")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            from mlxft.formats.tabular import read_delimited

            raw, container, unit = read_delimited(path, "\t" if suffix == ".tsv" else ","), suffix[1:], "line"
        elif suffix == ".parquet":
            from mlxft.formats.tabular import read_parquet

            raw, container, unit = read_parquet(path), "parquet", "row"
        else:
            from mlxft.formats.jsonl import read_json_rows

            raw, unit = read_json_rows(path), "line"
            container = "json" if suffix == ".json" else "jsonl"
        label = str(path)
    return _canonicalize(raw, label, container, unit, columns, limit, skip_bad_lines)


def _canonicalize(raw: Iterable[tuple[int, object]], path: str, container: str, unit: str,
                  columns, limit, skip_bad_lines) -> RecordSet:
    rows: list[tuple[int, dict]] = []
    skipped: list[str] = []
    shape: str | None = None
    mapping: dict[str, str] | None = None  # data.columns, once this source is known to need it
    for loc, record in raw:
        if limit is not None and len(rows) >= limit:
            break
        try:
            if isinstance(record, RowError):
                raise record
            if columns and not rows and mapping is None and isinstance(record, dict):
                mapping = columns if needs_mapping(record, columns) else {}
            record = rename_columns(record, mapping) if isinstance(record, dict) else record
            row_shape = detect_shape(record)
            if shape is None:
                shape = row_shape
            elif row_shape != shape and {row_shape, shape} != {"chat", "tools"}:
                raise RowError(f"is {row_shape} format but earlier {unit}s are {shape}")
            elif row_shape == "tools":  # a tool-calling file may hold plain conversations too
                shape = "tools"
            rows.append((loc, to_canonical(record, row_shape)))
        except RowError as exc:
            if not skip_bad_lines:
                raise row_error(path, loc, unit, str(exc)) from None
            skipped.append(f"{where(path, loc, unit)}: {exc}")
    if not rows:
        raise DataError(path, None, "no usable samples (the file is empty" +
                        (f"; {len(skipped)} bad {unit}s skipped)" if skipped else ")"))
    shape = shape or "text"
    return RecordSet(rows=rows, fmt=CANONICAL[shape], shape=shape, container=container, path=path,
                     unit=unit, skipped=skipped)
