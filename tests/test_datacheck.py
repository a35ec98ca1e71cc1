"""`mlxft data check`: planted exact and near duplicates and train/valid leakage are found and
named; the quickstart data (paraphrased questions sharing answers) is reported clean; truncation,
answers that never end, short answers and the rendered trained spans are reported."""

import json
import random

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.config import RECIPES_DIR
from mlxft.data import load_dataset

QUICKSTART = RECIPES_DIR / "data" / "quickstart"
TOPICS = ["volcano", "glacier", "harbour", "orchard", "library", "railway", "bakery", "lighthouse", "meadow",
          "canyon", "market", "observatory", "vineyard", "workshop", "theatre", "monastery"]
ACTIONS = ["visit", "photograph", "paint", "describe", "map", "restore", "study", "explore"]


def distinct_rows(n: int, seed: int = 0) -> list[dict]:
    """n conversations that are clearly different from each other."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, action = TOPICS[i % len(TOPICS)], ACTIONS[(i // len(TOPICS)) % len(ACTIONS)]
        q = f"How would I {action} the {topic} number {i} near town {rng.randint(1, 999)}?"
        a = (f"To {action} the {topic} number {i}, start early, bring {rng.choice(['water', 'a map', 'a camera'])}, "
             f"and ask the keeper about route {rng.randint(1, 99)} before {rng.choice(['noon', 'dusk', 'ten'])}.")
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def check(*args) -> dict:
    res = CliRunner().invoke(cli, ["data", "check", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("held_out, count", [("valid.jsonl", 10), ("test.jsonl", 20)])
def test_quickstart_data_is_clean(held_out, count):
    """Training data against the early-stopping questions and against the held-out test questions."""
    r = check(str(QUICKSTART / "train.jsonl"), str(QUICKSTART / held_out), "--max-seq-len", "256")
    assert [f["role"] for f in r["files"]] == ["train", "valid"]
    assert [f["samples"] for f in r["files"]] == [68, count]
    assert r["exact_duplicates"]["count"] == 0 and r["near_duplicates"]["count"] == 0
    assert r["leakage"]["checked"] and r["leakage"]["exact"] == 0 and r["leakage"]["near"] == 0
    assert r["truncated"]["count"] == 0 and r["never_end"]["count"] == 0 and r["short_answers"]["count"] == 0
    assert 0.2 < r["loss_tokens"]["share"] < 0.6
    assert r["advice"] == []


def test_finds_planted_duplicates_near_duplicates_and_leakage(tmp_path):
    rows = distinct_rows(60)
    train = list(rows[:50])
    train.append(json.loads(json.dumps(rows[3])))                 # exact copy of line 4 -> line 51
    near = json.loads(json.dumps(rows[7]))                         # near copy of line 8 -> line 52
    near["messages"][0]["content"] = near["messages"][0]["content"].lower().replace("?", " ??")
    near["messages"][1]["content"] = near["messages"][1]["content"].replace("start early", "start very early")
    train.append(near)
    valid = list(rows[50:])
    valid.append(json.loads(json.dumps(rows[10])))                 # train line 11 leaks into valid line 11
    leak = json.loads(json.dumps(rows[20]))                        # train line 21 nearly leaks -> valid line 12
    leak["messages"][1]["content"] = leak["messages"][1]["content"].replace("bring", "pack")
    valid.append(leak)
    t, v = write(tmp_path / "train.jsonl", train), write(tmp_path / "valid.jsonl", valid)
    r = check(t, "--valid", v)
    assert r["exact_duplicates"]["count"] == 1
    assert r["exact_duplicates"]["groups"] == [[f"{t}:4", f"{t}:51"]]
    assert [(p["a"], p["b"]) for p in r["near_duplicates"]["pairs"]] == [(f"{t}:8", f"{t}:52")]
    assert r["near_duplicates"]["pairs"][0]["similarity"] >= 0.8
    assert r["leakage"]["exact_pairs"] == [{"train": [f"{t}:11"], "valid": [f"{v}:11"]}]
    assert [(p["train"], p["valid"]) for p in r["leakage"]["near_pairs"]] == [(f"{t}:21", f"{v}:12")]
    advice = " ".join(r["advice"])
    assert "exact duplicate" in advice and "near-duplicate" in advice and "validation loss will look better" in advice


def test_paraphrased_questions_sharing_an_answer_are_not_duplicates(tmp_path):
    answer = "The museum opens at nine every morning except on public holidays, when it stays closed."
    qs = ["When does the museum open?", "What time can I get into the museum?", "Is the museum open early?",
          "At what hour does the museum open its doors?"]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in qs]
    r = check(write(tmp_path / "t.jsonl", rows))
    assert r["exact_duplicates"]["count"] == 0 and r["near_duplicates"]["count"] == 0
    assert not r["leakage"]["checked"]


def test_many_distinct_samples_give_no_false_duplicates(tmp_path):
    r = check(write(tmp_path / "t.jsonl", distinct_rows(400, seed=1)))
    assert r["exact_duplicates"]["count"] == 0 and r["near_duplicates"]["count"] == 0


def test_truncation_and_answers_that_never_end(tmp_path):
    long_answer = " ".join(["The answer goes on and on."] * 30)
    rows = distinct_rows(5) + [{"messages": [{"role": "user", "content": "Tell me everything."},
                                             {"role": "assistant", "content": long_answer}]}]
    t = write(tmp_path / "t.jsonl", rows)
    r = check(t, "--max-seq-len", "128")
    assert r["truncated"]["samples"] == [f"{t}:6"]
    assert r["never_end"]["samples"] == [f"{t}:6"]
    assert r["lengths"]["histogram"][-1] == {"from": 129, "to": None, "count": 1}
    assert sum(b["count"] for b in r["lengths"]["histogram"]) == 6
    assert any("raise train.max_seq_len" in a for a in r["advice"])


def test_short_answers_and_rendered_spans(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Y"}]},
            {"messages": [{"role": "user", "content": "Name the capital of France."},
                          {"role": "assistant", "content": "Paris is the capital of France."}]}]
    t = write(tmp_path / "t.jsonl", rows)
    r = check(t)
    assert r["short_answers"]["samples"] == [f"{t}:1"]
    trained = "".join(s["text"] for s in r["rendered"]["segments"] if s["trained"])
    assert trained == "Y<|im_end|>"
    assert "Is water wet?" in "".join(s["text"] for s in r["rendered"]["segments"] if not s["trained"])


def test_other_formats_and_name_roles(tmp_path):
    import csv

    with open(tmp_path / "qa.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        w.writerows([["What is two plus two?", "Four."], ["What is two plus two?", "Four."], ["Capital of Peru?", "Lima."]])
    write(tmp_path / "my-val.jsonl", [{"prompt": "Capital of Peru?", "completion": "Lima."}])
    r = check(str(tmp_path / "qa.csv"), str(tmp_path / "my-val.jsonl"),
              "--set", "data.columns={prompt: question, completion: answer}")
    assert [(f["role"], f["format"]) for f in r["files"]] == [("train", "completions (csv)"), ("valid", "completions")]
    assert r["exact_duplicates"]["groups"] == [[f"{tmp_path}/qa.csv:2", f"{tmp_path}/qa.csv:3"]]
    assert r["leakage"]["exact"] == 1


def test_bad_rows_are_reported_not_fatal(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps(distinct_rows(1)[0]) + "\n{broken\n")
    r = check(str(t))
    assert r["files"][0]["skipped"] == 1 and "--skip-bad-lines" in r["advice"][0]


def test_human_report_and_train_start_summary(tmp_path, default_model_dir, capsys):
    res = CliRunner().invoke(cli, ["data", "check", str(QUICKSTART / "train.jsonl"), str(QUICKSTART / "valid.jsonl")])
    assert res.exit_code == 0
    assert "No problems found." in res.stdout and "Leakage train -> valid: none" in res.stdout
    assert "⟦Fixing a flat tire at Brightwater Bicycles costs 12 dollars.<|im_end|>⟧" in res.stdout
    from mlxft.datacheck import report_at_train_start
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    rows = distinct_rows(6)
    rows.append(rows[0])
    train = load_dataset(write(tmp_path / "t.jsonl", rows), tok, 256)
    valid = load_dataset(write(tmp_path / "v.jsonl", [rows[1]]), tok, 256)
    report_at_train_start(train, valid, tok, 256)
    err = capsys.readouterr().err
    assert err.startswith("data check: 8 samples (chat)") and "1 exact duplicate:" in err
    assert "validation loss will look better" in err
