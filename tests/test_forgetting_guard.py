"""Learning without forgetting by default: the retention floor decides which adapter is kept and
when training stops, early stopping is on without being asked for, the open settings are chosen
from the data and the model, the batched baseline equals the one-at-a-time one, and
`train.dtype: auto` follows the measured matmul speed, not a CPU flag."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import write_jsonl
from tests.helpers.retention import script_validation


def _train(model, tmp_path, data, *sets, valid=None):
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    cfg = build_config(None, ["train.dtype=float32", "data.replay=0", "retention.probes=4",
                              "retention.max_new_tokens=6", *sets],
                       {"model": str(model), "backend": "torch",
                        "data": {"train": str(data), "valid": str(valid or data)}})
    return train_run(cfg, tmp_path / "run")


@pytest.fixture
def texts(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i} of the set"} for i in range(8)])


@pytest.mark.parametrize("score_at", ["lazy", "every"])
@pytest.mark.parametrize("floor, chosen", [(0.9, 2), (0.0, 4)])
def test_floor_changes_the_chosen_adapter(tiny_model_dir, tmp_path, texts, monkeypatch, floor, chosen, score_at):
    """Validation keeps improving while retention falls: with the floor at 0.9 the adapter kept
    is the last one at or above it (step 2), without a floor the lowest validation loss (step 4).
    Scored lazily, only the candidates from the lowest loss down to the first that meets the
    floor are scored, after training."""
    script_validation(monkeypatch, [6.0, 5.0, 4.0, 3.0, 2.0], [0.99, 0.95, 0.85, 0.80])
    summary = _train(tiny_model_dir, tmp_path, texts, "train.steps=4", "train.eval_every=1",
                     f"retention.floor={floor}", f"retention.score_at={score_at}")
    assert summary["steps"] == 4 and summary["chosen_step"] == chosen
    assert summary["retention"]["score"] == {2: 0.95, 4: 0.80}[chosen]
    assert summary["verdict"]["kept"] is (floor == 0.0 or summary["retention"]["score"] >= floor)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["results"]["chosen_step"] == chosen
    records = list(map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
    valid = [r.get("retention") for r in records if r["type"] == "valid"]
    after = [r["step"] for r in records if r["type"] == "retention"]
    if score_at == "every":
        assert valid == [None, 0.99, 0.95, 0.85, 0.80] and after == []
    else:
        assert valid == [None] * 5 and after == {2: [4, 3, 2], 4: [4]}[chosen]
        assert not (tmp_path / "run" / "candidates").exists()


def test_below_the_floor_and_not_improving_stops(tiny_model_dir, tmp_path, texts, monkeypatch):
    """Retention under the floor while validation still improves: training goes on; under the
    floor at the second validation in a row that did not improve: it stops (patience 5 would
    have gone on), keeping the last adapter above it."""
    script_validation(monkeypatch, [6.0, 5.0, 4.0, 4.5, 4.4, 4.3], [0.95, 0.85, 0.80, 0.70, 0.60])
    summary = _train(tiny_model_dir, tmp_path, texts, "train.steps=10", "train.eval_every=1",
                     "train.early_stop_patience=5")
    assert summary["early_stopped"] is True and summary["steps"] == 4
    assert "retention 0.700 fell below retention.floor" in summary["stop_reason"]
    assert summary["chosen_step"] == 1


def test_below_the_floor_everywhere_keeps_the_most_retentive(tiny_model_dir, tmp_path, texts, monkeypatch):
    script_validation(monkeypatch, [6.0, 5.0, 4.0, 3.0], [0.85, 0.88, 0.70])
    summary = _train(tiny_model_dir, tmp_path, texts, "train.steps=3", "train.eval_every=1")
    assert summary["chosen_step"] == 2 and summary["verdict"]["kept"] is False


def test_early_stopping_is_on_by_default(tiny_model_dir, tmp_path):
    """Trained hard on one chant and validated on other text, with no early-stopping setting
    given, the run stops well before its step budget."""
    from mlxft.config import Config

    assert Config().train.early_stop_patience == 2
    chant = write_jsonl(tmp_path / "train.jsonl", [{"messages": [
        {"role": "user", "content": "chant"}, {"role": "assistant", "content": "zim zam zoom " * 5}]}] * 8)
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]}])
    summary = _train(tiny_model_dir, tmp_path, chant, "train.steps=200", "train.eval_every=2",
                     "train.learning_rate=5e-2", "lora.rank=16", "retention.enabled=false", valid=valid)
    assert summary["early_stopped"] is True and summary["steps"] < 200
    assert summary["steps"] - summary["best_step"] == 2 * 2
    assert "validation loss has not improved" in summary["stop_reason"]


def test_open_settings_are_chosen_from_data_and_model():
    from mlxft.config import Config
    from mlxft.defaults import auto_epochs, auto_learning_rate, resolve

    assert auto_epochs(50) == 10 and auto_epochs(5000) == 3 and auto_epochs(10**6) == 1
    assert auto_learning_rate(576) == pytest.approx(1e-3)
    assert auto_learning_rate(4096) == pytest.approx(1e-3 * (576 / 4096) ** 0.5)
    assert auto_learning_rate(65536) == pytest.approx(2e-4)
    cfg = Config()
    line = resolve(cfg, 68, 576)
    assert cfg.train.epochs == 10 and cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.eval_every == 9  # 17 steps per epoch at batch 4: about twice per epoch
    assert "68 samples" in line and "hidden size 576" in line and "retention >= 0.9" in line
    assert resolve(cfg, 68, 576) is None  # nothing left open
    fixed = Config()
    fixed.train.steps, fixed.train.learning_rate, fixed.train.eval_every = 30, 2e-4, 5
    assert resolve(fixed, 68, 576) is None and fixed.train.epochs is None


def test_batched_baseline_equals_one_at_a_time(tiny_model_dir, monkeypatch):
    """The retention baseline generated side by side (left-padded) equals the one generated
    prompt by prompt, token for token, and scores the same within float32 rounding."""
    from mlxft.backends.base import Backend
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.retention import build_baseline

    cfg = build_config(None, ["train.dtype=float32", "retention.probes=12", "retention.max_new_tokens=10"])
    backend = TorchBackend(cfg)
    backend.load(tiny_model_dir, train=False)
    batched = build_baseline(cfg, backend)
    monkeypatch.setattr(TorchBackend, "generate_batch", Backend.generate_batch)
    monkeypatch.setattr(TorchBackend, "row_scores", Backend.row_scores)
    single = build_baseline(cfg, backend)
    assert len(batched["probes"]) == len(single["probes"]) > 0
    lengths = {len(r["prompt_ids"]) for r in batched["probes"]}
    assert len(lengths) > 1  # prompts of different lengths really were padded side by side
    for b, s in zip(batched["probes"], single["probes"]):
        assert b["answer_ids"] == s["answer_ids"] and b["stopped"] == s["stopped"]
        # a sum of up to 10 token log-probs, each rounded by ~1.3e-5 nats (float32 log-sum-exp over
        # 49152 logits) and computed padded or alone: 1.3e-4 at most, 1e-3 is 8x that
        assert b["logprob"] == pytest.approx(s["logprob"], abs=1e-3) and b["agreement"] == s["agreement"]


@pytest.mark.parametrize("f32, bf16, expected", [(100.0, 800.0, "bfloat16"), (170.0, 163.0, "float32"),
                                                 (100.0, 125.0, "float32"), (100.0, None, "float32")])
def test_auto_dtype_follows_the_measurement(monkeypatch, f32, bf16, expected):
    """bf16 only where the device's measured matmul speed says it pays (the figures are mocked:
    a CPU with AMX, one with avx512_bf16 but no AMX, a marginal one, one that cannot measure)."""
    import torch

    import mlxft.devicebench
    from mlxft.backends.torch_device import pick_dtype

    monkeypatch.setattr(mlxft.devicebench, "peak_gflops",
                        lambda backend, dtype, device="cpu": {"float32": f32, "bfloat16": bf16}[dtype])
    assert pick_dtype("auto", "cpu") == getattr(torch, expected)
    assert pick_dtype("float32", "cpu") == torch.float32


def test_generate_prompts_file_matches_one_by_one(tiny_model_dir, tmp_path):
    """`mlxft generate --prompts-file` answers every prompt (batched) as `--prompt` does alone."""
    from click.testing import CliRunner

    from mlxft.cli import cli

    prompts = ["hello there", "What is the capital of France?", "Count to three, please, slowly"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts[:2]) + "\n\n" + json.dumps({"prompt": prompts[2]}) + "\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["generate", str(tiny_model_dir), "--prompts-file", str(path), "-n", "6",
                              "--backend", "torch"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        one = runner.invoke(cli, ["generate", str(tiny_model_dir), "--prompt", r["prompt"], "-n", "6", "--json",
                                  "--backend", "torch"])
        assert json.loads(one.stdout)["text"] == r["text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    res = runner.invoke(cli, ["generate", str(tiny_model_dir), "--prompts-file", str(bad)])
    assert res.exit_code == 1 and f"{bad}:2:" in res.output
