"""Property-based tests of the JSONL loader: whatever bytes a file holds, loading either
succeeds or fails with a DataError naming the file (and line, when a line is at fault)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxft.data import read_jsonl
from mlxft.errors import DataError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
record = st.one_of(
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": json_values}), max_size=4)}),
    json_values,
)
line = st.one_of(record.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=6))
def test_loader_never_crashes(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    try:
        records, fmt, skipped = read_jsonl(p)
    except DataError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
        return
    assert fmt in ("chat", "completions", "text") and records


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_crash(tmp_path, raw):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(raw)
    try:
        read_jsonl(p)
    except DataError as exc:
        assert str(p) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=6))
def test_skip_bad_lines_accounts_for_every_line(tmp_path, lines):
    p = tmp_path / "skip.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    try:
        records, _, skipped = read_jsonl(p, skip_bad_lines=True)
    except DataError as exc:
        assert "no usable samples" in str(exc)
        return
    nonblank = sum(1 for l in p.read_bytes().split(b"\n") if l.strip())
    assert len(records) + len(skipped) == nonblank
