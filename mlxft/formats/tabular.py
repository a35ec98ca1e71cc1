"""Spreadsheet-style data: CSV and TSV (Python's csv module; UTF-8, a header row naming the
columns) and Parquet (pyarrow, read in record batches). Each row becomes a dict keyed by column
name; `data.columns` maps those names to record fields. Cells holding lists (messages,
conversations, tools) may be JSON text. Rows are numbered by their first line (CSV/TSV) or by
their 0-based index (Parquet)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from mlxft.errors import DataError
from mlxft.formats.records import RowError

MAX_FIELD_BYTES = 8 * 1024 * 1024


def read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(path, None, f"cannot read ({exc.strerror})") from None
    with fh:
        reader = csv.reader(fh, delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DataError(path, 1, "no header row naming the columns")
            header = [h.strip() for h in header]
            line = reader.line_num + 1
            for cells in reader:
                start, line = line, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield start, RowError(f"has {len(cells)} cells but the header names {len(header)} columns")
                    continue
                yield start, {h: c for h, c in zip(header, cells) if h}
        except UnicodeDecodeError as exc:
            raise DataError(path, line, f"not valid UTF-8 (byte {exc.start} of a read block)") from None
        except csv.Error as exc:
            raise DataError(path, line, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})") from None


def read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise DataError(path, None, "reading Parquet needs pyarrow (pip install 'mlxft[datasets]')") from None

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, None, f"not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
    index = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, None, f"row {index}: cannot read Parquet data "
                        f"({' '.join(str(exc).split())[:160]})") from None
