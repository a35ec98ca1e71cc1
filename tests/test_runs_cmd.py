"""`mlxft runs`: the listing (model, data, steps, final/best validation loss, retention) of run
folders, `--json`, a broken run that does not break the listing, and `runs show` with its
terminal charts and loss.png."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mlxft.cli import cli


def fake_run(path, *, model="default", valid=(2.0, 1.5, 1.7), retention=0.93, status="done"):
    """A run directory as train_run leaves it, without training."""
    from mlxft.runs import create_run

    run = create_run(path, model=model, model_path="/models/x", backend="torch", status=status,
                     total_steps=30)
    (run.path / "config.yaml").write_text("model: null\ndata:\n  train: data/shop/train.jsonl\n"
                                          "train:\n  steps: 30\n")
    rows = [{"type": "train", "step": s, "loss": 3.0 - s * 0.05} for s in range(1, 31)]
    rows += [{"type": "valid", "step": 10 * (i + 1), "loss": v} for i, v in enumerate(valid)]
    (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.update_meta(results={"steps": 30, "total_steps": 30, "best_val_loss": min(valid), "early_stopped": False,
                             "retention": {"score": retention, "agreement": 0.8, "adapter": "best",
                                           "warn_below": 0.9, "worst": []}})
    return run.path


def test_runs_list_and_json(tmp_path):
    fake_run(tmp_path / "runs" / "alpha")
    fake_run(tmp_path / "runs" / "beta", model="HuggingFaceTB/SmolLM2-135M-Instruct", valid=(2.5, 2.0),
             retention=0.61, status="interrupted")
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.json").write_text("{not json")
    (tmp_path / "runs" / "not-a-run").mkdir()
    res = CliRunner().invoke(cli, ["runs", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"alpha", "beta", "broken"}
    a = rows["alpha"]
    assert (a["model"], a["data"], a["steps"], a["total_steps"]) == ("default", "data/shop/train.jsonl", 30, 30)
    assert (a["final_val_loss"], a["best_val_loss"], a["best_step"], a["retention"]) == (1.7, 1.5, 20, 0.93)
    assert rows["beta"]["status"] == "interrupted" and rows["broken"]["status"] == "unreadable"
    table = CliRunner().invoke(cli, ["runs"])
    assert table.exit_code == 0
    for text in ("alpha", "train.jsonl", "30/30", "1.7000", "1.5000 @20", "0.930", "0.610", "unreadable"):
        assert text in table.stdout, text
    other = CliRunner().invoke(cli, ["runs", str(tmp_path / "runs" / "beta"), "--json"])  # a folder, or one run
    assert [r["name"] for r in json.loads(other.stdout)] == ["beta"]
    empty = CliRunner().invoke(cli, ["runs", str(tmp_path / "nothing")])
    assert empty.exit_code == 0 and "No runs" in empty.output


def test_runs_show(tmp_path):
    path = fake_run(tmp_path / "runs" / "alpha")
    res = CliRunner().invoke(cli, ["runs", "show", str(path)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "train: data/shop/train.jsonl" in out  # the config
    assert "best validation loss: 1.5000 at step 20" in out and "retention: 0.930" in out
    assert "training loss:" in out and "validation loss:" in out and "•" in out and "└" in out
    assert (path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = CliRunner().invoke(cli, ["runs", "show", str(path), "--json", "--no-png"])
    data = json.loads(js.stdout)
    assert data["config"]["train"]["steps"] == 30 and data["valid_loss"][1] == [20, 1.5]
    assert data["retention"] == 0.93 and len(data["train_loss"]) == 30
    missing = CliRunner().invoke(cli, ["runs", "show", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not a run directory" in missing.output
    helped = CliRunner().invoke(cli, ["runs", "--help"])
    assert helped.exit_code == 0 and "show" in helped.output
