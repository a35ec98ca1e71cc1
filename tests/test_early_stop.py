"""Early stopping on validation loss (train.early_stop_patience): training stops after that many
evaluations without improvement, and the best-by-validation adapter is the one saved in
RUN/adapter-best, picked by default for eval, fuse and export."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import write_jsonl


def _cfg(model, train, valid, *sets):
    from mlxft.config import build_config

    return build_config(None, ["train.dtype=float32", "retention.enabled=false", "data.replay=0", *sets],
                        {"model": str(model), "backend": "torch", "data": {"train": str(train), "valid": str(valid)}})


def _lora_state(backend) -> dict:
    return {n.replace(".default", ""): p.detach().clone() for n, p in backend.model.named_parameters() if "lora_" in n}


def test_early_stop_scripted(tiny_model_dir, tmp_path, monkeypatch):
    """Validation losses 6 (step 0, before training), 5, 4, 4.5, 4.6, ...: with patience 2 the run
    stops at step 4 and the adapter saved as best is the step-2 one."""
    from safetensors.torch import load_file

    from mlxft.pipeline import train_run
    from mlxft.sources import resolve_model
    from mlxft.trainer import Trainer

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i} of the set"} for i in range(8)])
    losses = iter([6.0, 5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0])
    snapshots = {}

    def scripted(self):
        snapshots[self.state.step] = _lora_state(self.backend)
        return {"loss": next(losses), "ppl": 1.0, "accuracy": 0.0, "tokens": 1}

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    summary = train_run(_cfg(tiny_model_dir, data, data, "train.steps=20", "train.eval_every=1",
                             "train.early_stop_patience=2", "train.learning_rate=1e-2"), tmp_path / "run")
    assert summary["early_stopped"] is True and summary["initial_val"]["loss"] == 6.0
    assert summary["steps"] == 4 and summary["best_step"] == 2 and summary["best_val_loss"] == 4.0
    valid = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "valid"]
    assert [r["step"] for r in valid] == [0, 1, 2, 3, 4]
    best = load_file(str(tmp_path / "run" / "adapter-best" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    for name, value in snapshots[2].items():
        key = next(k for k in best if k.endswith(name.split("base_model.model.", 1)[-1]))
        assert best[key].equal(value), key
    assert any(not best[k].equal(last[k]) for k in best)  # the last adapter moved on
    # fuse, export, eval, generate and chat resolve a run to its best adapter by default
    assert resolve_model(str(tmp_path / "run")).adapter == tmp_path / "run" / "adapter-best"
    assert resolve_model(str(tmp_path / "run"), adapter="last").adapter == tmp_path / "run" / "adapter"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"


def test_early_stop_on_real_overfitting(tiny_model_dir, tmp_path):
    """Trained hard on one chant and validated on different text, the tiny model's validation loss
    stops improving and training stops well before the step budget; adapter-best scores the best
    validation loss the trainer recorded."""
    from click.testing import CliRunner

    from mlxft.cli import cli
    from mlxft.pipeline import train_run

    chant = write_jsonl(tmp_path / "train.jsonl", [{"messages": [
        {"role": "user", "content": "chant"}, {"role": "assistant", "content": "zim zam zoom " * 5}]}] * 8)
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]}])
    summary = train_run(_cfg(tiny_model_dir, chant, valid, "train.steps=200", "train.eval_every=2",
                             "train.early_stop_patience=3", "train.learning_rate=5e-2", "lora.rank=16"),
                        tmp_path / "run")
    assert summary["early_stopped"] is True and summary["steps"] < 200
    assert summary["steps"] - summary["best_step"] == 3 * 2  # three evaluations after the best
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    # the trainer's figure (LoRA side path) against eval's (adapter merged into the weights): one
    # more float32 rounding per weight, ~1e-6 relative; see test_eval.py's note
    assert got["tuned"]["loss"] == pytest.approx(summary["chosen_val_loss"], rel=1e-4)
    assert summary["chosen_val_loss"] <= summary["best_val_loss"]
    assert got["tuned"]["loss"] <= summary["last_val_loss"]
