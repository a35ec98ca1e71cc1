"""Adapters cross backends: one trained on MLX loads in the PyTorch backend and in PEFT directly
with the same logits, and one trained by the PyTorch backend loads in MLX (LoRA and DoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxft.data import collate
from tests.helpers.mlx import config, samples

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TOKENS = [[1, 17, 305, 42, 9, 77, 8, 600, 3, 12]]


def _mlx_backend(cfg, path, **kw):
    from mlxft.backends.mlx_backend import MLXBackend

    be = MLXBackend(cfg)
    be.load(path, **kw)
    return be


def _torch_backend(cfg, path, **kw):
    from mlxft.backends.torch_backend import TorchBackend

    be = TorchBackend(cfg, device="cpu")
    be.load(path, **kw)
    return be


def _mlx_logits(be):
    return np.array(be.model(mx.array(TOKENS)).astype(mx.float32))[0]


def _torch_logits(be):
    with torch.no_grad():
        return be._causal_lm()(input_ids=torch.tensor(TOKENS)).logits[0].float().numpy()


def _train(be, steps=3):
    batch = collate(samples(), 2)
    for _ in range(steps):
        assert be.train_step([batch], 3e-2).finite


def _close(a, b, base):
    moved = np.abs(a - base).max()
    assert moved > 1e-2, "the adapter must change the logits for the comparison to mean anything"
    # both sides compute the same adapter in float32 (MLX against PyTorch or mlx-lm): rounding of
    # ~1e-6 relative on logits of order 1; 1e-3 of the adapter's own effect (at least 1e-2) keeps
    # a mis-scaled adapter (alpha/r off, rsLoRA mixed up: effect off by x2 or more) failing
    assert np.abs(a - b).max() < 1e-3 * max(1.0, moved), (np.abs(a - b).max(), moved)


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_mlx_adapter_loads_in_torch_and_peft(tiny_model_dir, tmp_path, lora_type):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config(lora_type)
    cfg.lora.layers = 1  # last block only: layers_to_transform must survive the round trip
    be = _mlx_backend(cfg, tiny_model_dir)
    _train(be)
    adapter = tmp_path / "adapter"
    be.save_adapter(adapter)
    be.model.eval()
    ours = _mlx_logits(be)

    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM" and meta["bias"] == "none"
    assert meta["r"] == 4 and meta["lora_alpha"] == 8 and meta["layers_to_transform"] == [1]
    assert meta["use_dora"] == (lora_type == "dora")
    assert set(meta["target_modules"]) == set(cfg.lora.targets)
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and np.abs(b).max() > 0
    assert ("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in tensors) == (lora_type == "dora")
    assert not any(".layers.0." in k for k in tensors)

    base = _torch_logits(_torch_backend(config(), tiny_model_dir, train=False))
    _close(_torch_logits(_torch_backend(config(), tiny_model_dir, adapter=adapter, train=False)), ours, base)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        _close(peft_model(torch.tensor(TOKENS)).logits[0].numpy(), ours, base)


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_torch_adapter_loads_in_mlx(tiny_model_dir, tmp_path, lora_type):
    cfg = config(lora_type)
    tb = _torch_backend(cfg, tiny_model_dir)
    _train(tb)
    adapter = tmp_path / "adapter"
    tb.save_adapter(adapter)
    tb.model.eval()
    theirs = _torch_logits(tb)

    base = _mlx_logits(_mlx_backend(config(), tiny_model_dir, train=False))
    be = _mlx_backend(cfg, tiny_model_dir, adapter=adapter, train=False)
    _close(_mlx_logits(be), theirs, base)

    # loaded trainable (a resumed run) it keeps training, and saves back to the same layout
    be = _mlx_backend(cfg, tiny_model_dir, adapter=adapter, train=True)
    trainable, _ = be.trainable_parameters()
    assert trainable == sum(p.numel() for p in tb.model.parameters() if p.requires_grad)
    _train(be, steps=1)
    again = tmp_path / "again"
    be.save_adapter(again)
    from safetensors.numpy import load_file

    assert set(load_file(str(again / "adapter_model.safetensors"))) == \
        set(load_file(str(adapter / "adapter_model.safetensors")))
