"""JSON Lines files (one record per line), and .json files holding one array of records
(the way Alpaca and ShareGPT exports are often shipped). Yields (line number, record), or a
RowError in place of a record that cannot be parsed. A UTF-8 byte-order mark (Windows editors
write one) is skipped; CRLF line ends are whitespace to JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from mlxft.errors import DataError
from mlxft.formats.records import RowError

MAX_LINE_BYTES = 8 * 1024 * 1024
BOM = b"\xef\xbb\xbf"


def read_json_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, f"cannot read ({exc.strerror})") from None
    with fh:
        head = fh.read(4096)
        fh.seek(len(BOM) if head.startswith(BOM) else 0)
        if path.suffix.lower() == ".json" and head.removeprefix(BOM).lstrip().startswith(b"["):
            yield from _json_array(path, fh.read())
            return
        for line_no, raw in enumerate(fh, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield line_no, RowError(f"line is {len(raw) // (1024 * 1024)} MiB, over the "
                                        f"{MAX_LINE_BYTES // (1024 * 1024)} MiB limit")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, RowError(f"not valid UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")


def _json_array(path: Path, data: bytes) -> Iterator[tuple[int, object]]:
    """Records of a JSON array, each numbered by the line its object starts on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, f"not valid UTF-8 (byte {exc.start})") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(path, text.count("\n", 0, pos) + 1, "not valid JSON (the array is not closed)")
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield line, record
