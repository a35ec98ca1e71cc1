"""The data as training read it (mlxft/training_data.py): every consumer (train, eval, data check,
the export self-check, replay sizing) reads the same samples, honouring data.columns, data.split,
data.limit and --skip-bad-lines, on a CSV and on a saved Hugging Face dataset folder; a mapping
applies only to the sources that need it; a byte-order mark and CRLF line ends are read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import cli

MAX_SEQ_LEN = 64
LIMIT = 9


def qa_rows() -> list[dict]:
    """Twelve question/answer rows. Row 2 has an empty answer (a bad row, skipped), and row 5's
    prompt is so long that truncation to MAX_SEQ_LEN leaves no answer token (dropped only at
    tokenization, which a split of raw records would not see)."""
    rows = [{"q": f"What is code {i}?", "a": f"Code {i} is {'alpha bravo charlie'.split()[i % 3]}."}
            for i in range(12)]
    rows[2]["a"] = ""
    rows[5]["q"] = "Please read this first. " * 40 + rows[5]["q"]
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_source(kind: str, tmp: Path) -> tuple[str, list[str]]:
    """(data.train spec, data.* --set lines) for a CSV, or for a saved DatasetDict whose `dev`
    split holds the rows (its `train` split holds other rows, so reading the wrong split shows)."""
    if kind == "csv":
        return str(write_csv(tmp / "codes.csv", qa_rows())), []
    datasets = pytest.importorskip("datasets")
    decoy = [{"q": "Decoy question?", "a": "Decoy answer."}] * 20
    datasets.DatasetDict({"train": datasets.Dataset.from_list(decoy),
                          "dev": datasets.Dataset.from_list(qa_rows())}).save_to_disk(str(tmp / "saved"))
    return str(tmp / "saved"), ["data.split=dev"]


def expected_sources(spec: str, kind: str) -> list[str]:
    """The first LIMIT usable rows, by hand: rows 2 (bad) and 5 (nothing left to learn) do not
    count. data.limit caps the records read, so row 5, dropped later, still uses one of them."""
    rows = [i for i in range(12) if i != 2][:LIMIT]
    rows = [i for i in rows if i != 5]
    # CSV rows are named by the line they start on (header = line 1); dataset rows by 0-based index
    return [f"{spec}:{i + 2}" if kind == "csv" else f"{spec}: row {i}" for i in rows]


def config_for(model_dir, spec: str, data_sets: list[str], *more: str):
    from mlxft.config import build_config

    return build_config(None, [f"model={model_dir}", f"data.train={spec}",
                               "data.columns={prompt: q, completion: a}", f"data.limit={LIMIT}",
                               f"train.max_seq_len={MAX_SEQ_LEN}", "data.valid_split=0.25", "seed=3",
                               "train.steps=1", "train.batch_size=2", "train.dtype=float32",
                               "retention.enabled=false", "data.replay=0", "backend=torch", *data_sets, *more])


@pytest.mark.parametrize("kind", ["csv", "hf"])
def test_every_consumer_reads_the_samples_training_read(kind, tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("torch")
    import mlxft.replay as replay
    import mlxft.retention as retention
    import mlxft.trainer as trainer_module
    from mlxft.pipeline import train_run
    from mlxft.sources import resolve_model
    from mlxft.tokenizer import load_tokenizer
    from mlxft.training_data import validation_records

    spec, data_sets = write_source(kind, tmp_path)
    cfg = config_for(tiny_model_dir, spec, data_sets, "data.replay=0.5")

    seen = {}
    real_trainer = trainer_module.Trainer

    def capture_trainer(cfg, run, backend, train_set, valid_set, **kw):
        seen["train"], seen["valid"] = train_set, valid_set
        seen["n_train"] = len(train_set) - len([s for s in train_set.samples if s.source.startswith("replay:")])
        return real_trainer(cfg, run, backend, train_set, valid_set, **kw)

    def capture_replay(cfg, run, backend, n):
        seen["replay_asked"] = n
        return []

    monkeypatch.setattr(trainer_module, "Trainer", capture_trainer)
    monkeypatch.setattr(replay, "replay_records", capture_replay)
    run = tmp_path / "run"
    train_run(cfg, run, skip_bad_lines=True)

    # train: the first LIMIT usable rows of the right split, bad and empty rows skipped, split 6/2
    want = expected_sources(spec, kind)
    train_sources = [s.source for s in seen["train"].samples if not s.source.startswith("replay:")]
    valid_sources = [s.source for s in seen["valid"].samples]
    assert sorted(train_sources + valid_sources) == sorted(want)
    assert len(valid_sources) == 2  # round(8 * 0.25)

    # replay: sized from the samples training read (0 before, when raw file lines were counted)
    assert seen["replay_asked"] == min(len(retention.load_probes(replay.REPLAY_PROMPTS)),
                                       replay.replay_count(0.5, seen["n_train"]))
    assert seen["replay_asked"] > 0

    # the export self-check: the trainer's validation records, in the trainer's order
    tokenizer = load_tokenizer(tiny_model_dir)
    assert validation_records(run, tokenizer) == seen["valid"].records
    from mlxft.commands.export import _validation_records

    engine = type("Engine", (), {"tokenizer": tokenizer})()
    assert _validation_records(resolve_model(str(run)), engine) == seen["valid"].records

    # eval RUN: the held-out samples training validated on
    import mlxft.evaluate as evaluate_module

    scored = []
    real_score = evaluate_module.score_dataset
    monkeypatch.setattr(evaluate_module, "score_dataset",
                        lambda engine, ds, *a, **k: scored.append([s.source for s in ds.samples]) or
                        real_score(engine, ds, *a, **k))
    res = CliRunner().invoke(cli, ["eval", str(run), "--json", "--skip-bad-lines"])
    assert res.exit_code == 0, res.output
    assert scored and all(sources == valid_sources for sources in scored)

    # data check with the run's recipe: every usable row of the right split, up to the limit
    res = CliRunner().invoke(cli, ["data", "check", "--recipe", str(run / "config.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [f["samples"] for f in report["files"]] == [len(want)]
    assert report["files"][0]["skipped"] == 2  # rows 2 and 5, named in the report


def test_eval_of_a_run_reads_its_validation_file_with_the_recipe_settings(tmp_path, tiny_model_dir):
    """A run with a mapped CSV as data.valid: `eval RUN` reads it with data.columns and
    data.limit (before, this path read the file bare and failed on the CSV's own column names)."""
    pytest.importorskip("torch")
    from mlxft.pipeline import train_run

    rows = qa_rows()
    del rows[5], rows[2]
    train = write_csv(tmp_path / "train.csv", rows)
    valid = write_csv(tmp_path / "valid.csv", [{"q": f"Which code is {i}?", "a": f"Code {i}."} for i in range(6)])
    cfg = config_for(tiny_model_dir, str(train), [f"data.valid={valid}", "data.limit=4"])
    train_run(cfg, tmp_path / "run")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["data"] == str(valid) and got["samples"] == 4 and got["format"] == "completions"


def test_a_mapping_applies_only_to_the_sources_that_need_it(tmp_path, tiny_model_dir):
    """docs/data.md: a mapped CSV beside a validation JSONL already in chat format."""
    from mlxft.tokenizer import load_tokenizer
    from mlxft.training_data import training_sets

    rows = qa_rows()
    del rows[5], rows[2]
    train = write_csv(tmp_path / "train.csv", rows)
    chat = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(3)]
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in chat))
    cfg = config_for(tiny_model_dir, str(train), [f"data.valid={valid}"])
    tr, va = training_sets(cfg, load_tokenizer(tiny_model_dir))
    assert tr.fmt == "completions" and len(tr) == LIMIT
    assert va.fmt == "chat" and va.records == [{"messages": r["messages"]} for r in chat]


def test_a_source_with_some_mapped_columns_missing_still_fails_naming_the_column(tmp_path):
    from mlxft.errors import DataError
    from mlxft.formats import read_records

    path = write_csv(tmp_path / "d.csv", [{"q": "Hi?", "text": "Hello."}])
    with pytest.raises(DataError, match=r"d\.csv:2: no column 'a' \(data.columns.completion\)"):
        read_records(path, columns={"prompt": "q", "completion": "a"})


@pytest.mark.parametrize("name, body", [
    ("bom.jsonl", lambda rows: "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in rows)),
    ("bom.json", lambda rows: "\ufeff[\r\n" + ",\r\n".join(json.dumps(r) for r in rows) + "\r\n]\r\n"),
    ("bom.csv", lambda rows: "\ufeffprompt,completion\r\n" +
     "".join(f"{r['prompt']},{r['completion']}\r\n" for r in rows)),
])
def test_byte_order_mark_and_crlf_are_read(tmp_path, name, body):
    from mlxft.formats import read_records

    rows = [{"prompt": f"Say {i}", "completion": f"{i}."} for i in range(3)]
    path = tmp_path / name
    path.write_bytes(body(rows).encode("utf-8"))
    got = read_records(path)
    assert [r for _, r in got.rows] == rows
    if name != "bom.json":
        assert [loc for loc, _ in got.rows] == ([1, 2, 3] if name == "bom.jsonl" else [2, 3, 4])
