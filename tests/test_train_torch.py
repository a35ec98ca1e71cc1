"""PyTorch backend end to end on a tiny model: loss falls, the run directory is complete, the
adapter loads in PEFT with identical logits, and a fixed seed repeats the loss curve."""

import json

import pytest

from mlxft.config import build_config
from mlxft.pipeline import train_run
from mlxft.runs import Run
from tests.helpers.data import ROWS

pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A tiny model whose embeddings are large enough (init 0.2) for a frozen tied head to express
    confident predictions, so LoRA can visibly fit a small set."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def tiny_cfg(model_dir, data_file, steps=30, **sets):
    base = [f"train.steps={steps}", "train.batch_size=4", "train.learning_rate=2e-2", "train.eval_every=10",
            "train.save_every=10", "train.dtype=float32", "lora.rank=8", "lora.alpha=16", "train.warmup=2",
            "retention.enabled=false"]
    base += [f"{k}={v}" for k, v in sets.items()]
    return build_config(None, base, {"model": str(model_dir), "data": {"train": str(data_file)}})


def test_loss_falls_and_run_dir_is_complete(tiny_model_dir, data_file, tmp_path):
    summary = train_run(tiny_cfg(tiny_model_dir, data_file), tmp_path / "run")
    run = Run(tmp_path / "run")
    rows = run.metrics()
    train = [r["loss"] for r in rows if r["type"] == "train"]
    valid = [r["loss"] for r in rows if r["type"] == "valid"]
    assert len(train) == 30 and len(valid) == 4  # steps 0 (before training), 10, 20, 30
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0  # nats
    assert summary["steps"] == 30 and summary["best_val_loss"] == min(valid)
    for name in ("config.yaml", "run.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter-best/adapter_model.safetensors",
                 "checkpoint/trainer.json", "checkpoint/optimizer.pt"):
        assert (run.path / name).is_file(), name
    meta = run.meta()
    assert meta["status"] == "done" and meta["backend"] == "torch"
    assert "train.steps" not in (run.path / "config.yaml").read_text()  # nested YAML, not flat keys
    assert "steps: 30" in (run.path / "config.yaml").read_text()


def test_adapter_loads_in_peft_with_identical_logits(tiny_model_dir, data_file, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlxft.inference import load_for_inference
    from tests.helpers.logit_stats import f32_bound

    train_run(tiny_cfg(tiny_model_dir, data_file, steps=5), tmp_path / "run")
    engine, resolved = load_for_inference(str(tmp_path / "run"), backend="torch")
    assert resolved.adapter == tmp_path / "run" / "adapter-best"
    ids = torch.tensor([engine.tokenizer("What is code 7?")["input_ids"]])
    ours = engine.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    plain = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, str(resolved.adapter)).eval()
    theirs = peft_model(input_ids=ids).logits
    exact = peft_model.double()(input_ids=ids).logits
    # Inference folds the adapter into the f32 weights (W + scale * B @ A once, instead of the side
    # path per call): equal to PEFT's unmerged forward up to float32 rounding, whose size depends
    # on the CPU's summation order and thread count. So the bound is PEFT's own float32 distance
    # from a float64 evaluation, measured here, widened as f32_bound derives (tests/helpers).
    bound = f32_bound(theirs.detach().numpy(), exact.detach().numpy(), base.config.intermediate_size)
    assert (ours.double() - exact).abs().max().item() <= bound
    # the adapter really changes the model, by far more than the rounding bound
    assert (plain.double() - exact).abs().max().item() > 100 * bound


def test_same_seed_same_curve(tiny_model_dir, data_file, tmp_path):
    curves = []
    for name in ("a", "b"):
        train_run(tiny_cfg(tiny_model_dir, data_file, steps=6, **{"lora.dropout": 0.1}), tmp_path / name)
        curves.append([r["loss"] for r in Run(tmp_path / name).metrics() if r["type"] == "train"])
    assert curves[0] == curves[1]


def test_grad_accumulation_matches_big_batch(tiny_model_dir, data_file, tmp_path):
    """batch 4 x accumulation 2 takes the same first step as batch 8 (same samples, same loss)."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.data import collate, load_dataset

    cfg = tiny_cfg(tiny_model_dir, data_file)
    losses = []
    for split in (1, 2):
        b = TorchBackend(cfg)
        b.load(tiny_model_dir)
        ds = load_dataset(data_file, b.tokenizer, 128)
        samples = ds.samples[:8]
        pad = b.tokenizer.pad_token_id
        batches = [collate(samples, pad)] if split == 1 else [collate(samples[:4], pad), collate(samples[4:], pad)]
        losses.append(b.train_step(batches, lr=1e-3).loss)
    # the same 8 samples' mean loss summed in one batch or two: float32 rounding of a ~10.8-nat
    # mean (ulp 9.5e-7) over differently shaped matmuls; 1e-5 is ~10 ulp, while weighting the two
    # halves by batch instead of by target count moves it by the halves' loss difference
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_dora_and_layer_subset_train(tiny_model_dir, data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, data_file, steps=3, **{"lora.type": "dora", "lora.layers": 1,
                                                          "lora.targets": "q_proj,v_proj"})
    train_run(cfg, tmp_path / "run")
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is True and adapter_cfg["layers_to_transform"] == [1]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("layers.1." in k for k in keys)
    assert any("lora_magnitude_vector" in k for k in keys)


def test_bad_targets_error(tiny_model_dir, data_file, tmp_path):
    from mlxft.errors import ModelError

    cfg = tiny_cfg(tiny_model_dir, data_file, steps=1, **{"lora.targets": "c_attn"})
    with pytest.raises(ModelError, match="lora.targets"):
        train_run(cfg, tmp_path / "run")
