"""`mlxft train --backend mlx` end to end on a tiny model (loss falls, run directory complete,
exact resume), DoRA on MLX, and QLoRA on a tiny 4-bit model made by mlx-lm's converter."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.helpers.mlx import write_chat

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SETS = ["train.batch_size=4", "train.learning_rate=2e-2", "train.eval_every=10", "train.save_every=5",
        "lora.rank=8", "lora.alpha=16", "train.warmup=2", "retention.enabled=false", "train.max_seq_len=96"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    """Tiny llama with embeddings large enough (init 0.2) for the tied head to fit a small set."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, model_dir):
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q") / "tiny-4bit"
    convert(str(model_dir), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


def _train(args):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["train", "--backend", "mlx", "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_training_loss_falls(model_dir, tmp_path):
    data = write_chat(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    summary = _train(["--model", str(model_dir), "--data", str(data), "--steps", "20", "--out", str(run),
                      *sum((["--set", s] for s in SETS), [])])
    rows = _metrics(run)
    train = [r["loss"] for r in rows if r["type"] == "train"]
    valid = [r["loss"] for r in rows if r["type"] == "valid"]
    assert len(train) == 20 and len(valid) == 3 and summary["steps"] == 20  # valid at steps 0, 10, 20
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4 - 1.0  # nats
    assert valid[-1] < valid[0] + 0.5
    for name in ("run.json", "metrics.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter-best/adapter_model.safetensors", "checkpoint/trainer.json",
                 "checkpoint/mlx_optimizer.safetensors"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["backend"] == "mlx" and meta["status"] == "done"
    peft_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16


def test_resume_continues_the_curve(model_dir, tmp_path, monkeypatch):
    """Interrupt a run after its step-6 checkpoint (SIGINT path), resume it, and compare the curve."""
    data = write_chat(tmp_path / "train.jsonl")
    sets = sum((["--set", s] for s in SETS + ["train.save_every=3", "train.eval_every=100"]), [])
    straight = tmp_path / "straight"
    _train(["--model", str(model_dir), "--data", str(data), "--steps", "8", "--out", str(straight), *sets])

    import mlxft.backends.mlx_backend as mb

    original = mb.MLXBackend.train_step
    calls = {"n": 0}

    def interrupting(self, batches, lr, n_total=None):
        result = original(self, batches, lr, n_total)
        calls["n"] += 1
        if calls["n"] == 6:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(mb.MLXBackend, "train_step", interrupting)
    cut = tmp_path / "cut"
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["train", "--backend", "mlx", "--model", str(model_dir), "--data", str(data),
                                      "--steps", "8", "--out", str(cut), *sets])
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(mb.MLXBackend, "train_step", original)
    result = CliRunner().invoke(cli, ["train", "--resume", str(cut), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    a = [r["loss"] for r in _metrics(straight) if r["type"] == "train"]
    b = [r["loss"] for r in _metrics(cut) if r["type"] == "train"]
    assert len(a) == len(b) == 8
    # the resumed run restores adapter, optimizer and data order exactly and repeats the same
    # computations: equal up to a few ulp of the ~10-nat losses (ulp 9.5e-7)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_qlora_and_dora_train_and_save(quantized_dir, tmp_path, lora_type):
    import mlx.nn as nn

    from mlxft.backends.mlx_backend import MLXBackend
    from mlxft.data import collate
    from tests.helpers.mlx import config, samples

    cfg = config(lora_type)
    cfg.train.dtype = "auto"
    be = MLXBackend(cfg)
    be.load(quantized_dir)
    q = be.model.layers[0].self_attn.q_proj
    assert isinstance(q.linear, nn.QuantizedLinear) and q.linear.bits == 4
    batch = collate(samples(), be.tokenizer.pad_token_id)
    losses = [be.train_step([batch], 3e-2).loss for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05
    from mlx.utils import tree_flatten

    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(be.model.trainable_parameters())}
    assert trainable == ({"lora_a", "lora_b", "m"} if lora_type == "dora" else {"lora_a", "lora_b"})
    adapter = tmp_path / "adapter"
    be.save_adapter(adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["use_dora"] == (lora_type == "dora") and meta["base_model_name_or_path"] == str(quantized_dir)
    again = MLXBackend(cfg)
    again.load(quantized_dir, adapter=adapter, train=False)
    # the same adapter saved and loaded: the reloaded side path rounds as the trained one, so the
    # summed loss (tens of nats over the batch's targets) agrees to float32 rounding (~1e-5);
    # 1e-3 allows a different evaluation order in the reloaded graph
    assert abs(again.eval_batch(batch).loss_sum - be.eval_batch(batch).loss_sum) < 1e-3
