"""MLX backend on `mlx[cpu]` with the tiny llama: first-step loss parity with the PyTorch backend
(LoRA, DoRA, packed batches, gradient accumulation), checkpointing, non-finite steps, exact
resume of optimizer state, generation, and one-line errors for what it cannot train."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from mlxft.data import collate, pack
from mlxft.errors import ModelError
from tests.helpers.mlx import config, load_mlx, load_torch, samples

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_first_step_loss_parity_with_torch(tiny_model_dir, lora_type):
    """LoRA B starts at zero in both, so the first loss is the base loss: within 1e-3."""
    cfg = config(lora_type)
    s = samples()
    plain, packed = collate(s, 2), pack(s, 2, 64)
    accumulated = [collate(s[:2], 2), collate(s[2:], 2)]
    results = {}
    for name, make in (("mlx", load_mlx), ("torch", load_torch)):
        be = make(cfg, tiny_model_dir)
        # eval of the same rows packed and as one padded batch, then a step and an accumulated step
        evals = (be.eval_batch(packed), be.eval_batch(plain))
        results[name] = (be.train_step([plain], 1e-3), *evals, be.train_step(accumulated, 1e-3))
    m, t = results["mlx"], results["torch"]
    assert m[0].finite and m[0].n_targets == t[0].n_targets == plain.n_targets
    # Losses are ~10.8 nats (ln 49152); float32 log-sum-exp over 49152 logits rounds by ~1.3e-5
    # nats, and MLX and PyTorch sum in different orders and use their own exp: 1e-3 between the
    # frameworks is ~75x that, yet one target token masked wrongly moves the mean by a whole
    # token's loss (~10 nats) over the target count. Within MLX (same kernels, other shapes) 1e-4.
    assert abs(m[0].loss - t[0].loss) < 1e-3
    assert abs(m[1].loss_sum - m[2].loss_sum) < 1e-3 * m[2].n_targets  # packing changes nothing
    assert abs(m[1].loss_sum / m[1].n_targets - t[1].loss_sum / t[1].n_targets) < 1e-3
    assert abs(m[1].loss_sum / m[1].n_targets - m[0].loss) < 1e-4  # eval agrees with the first step
    assert m[3].n_targets == t[3].n_targets == plain.n_targets
    assert math.isfinite(m[3].loss) and m[3].loss < m[0].loss + 0.05


def test_packing_accumulation_and_checkpointing_match(tiny_model_dir):
    s = samples()
    runs = []
    for grad_checkpoint in (False, True):
        be = load_mlx(config(grad_checkpoint=grad_checkpoint), tiny_model_dir)
        runs.append([be.train_step([collate(s, 2)], 1e-2), be.train_step([pack(s, 2, 64)], 1e-2),
                     be.train_step([collate(s[:2], 2), collate(s[2:], 2)], 1e-2)])
    # Checkpointing recomputes the same forward with the same kernels on the same inputs: equal
    # up to a few ulp of 10.8 (ulp 9.5e-7) if MLX fuses differently. The steps that follow see
    # Adam updates of at most lr per element, identical when the gradients are; 1e-5 / 1e-4
    # leave 10-100 ulp.
    for a, b in zip(*runs):
        assert abs(a.loss - b.loss) < 1e-5 and abs(a.grad_norm - b.grad_norm) < 1e-4
    losses = [r.loss for r in runs[0]]
    assert losses[0] > losses[1] > losses[2]  # packed and accumulated steps keep training


def test_nonfinite_step_is_skipped(tiny_model_dir):
    from mlx.utils import tree_flatten

    be = load_mlx(config(), tiny_model_dir)
    be.train_step([collate(samples(), 2)], 1e-2)
    q = be.model.layers[0].self_attn.q_proj
    q.lora_b = q.lora_b * mx.array(float("inf"))
    before = {k: np.array(v) for k, v in tree_flatten(be.model.trainable_parameters())}
    opt_before = {k: np.array(v) for k, v in tree_flatten(be.optimizer.state)}
    r = be.train_step([collate(samples(), 2)], 1e-2)
    assert not r.finite
    after = {k: np.array(v) for k, v in tree_flatten(be.model.trainable_parameters())}
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    for k, v in tree_flatten(be.optimizer.state):
        if k != "learning_rate":
            np.testing.assert_array_equal(opt_before[k], np.array(v))


def test_resume_restores_optimizer_state(tiny_model_dir, tmp_path):
    s = samples()
    batches = [collate(s[:2], 2), collate(s[2:], 2), collate(s, 2)]
    be = load_mlx(config(), tiny_model_dir)
    be.train_step([batches[0]], 1e-2)
    be.train_step([batches[1]], 1e-2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    be.save_adapter(ckpt / "adapter")
    be.save_state(ckpt)
    expected = be.train_step([batches[2]], 1e-2)
    resumed = load_mlx(config(), tiny_model_dir, adapter=ckpt / "adapter", train=True)
    resumed.load_state(ckpt)
    got = resumed.train_step([batches[2]], 1e-2)
    # the restored adapter and optimizer state are bit-for-bit the saved ones and the step is the
    # same computation, so it repeats exactly; 1e-6 is one ulp of the 10.8-nat loss
    assert abs(got.loss - expected.loss) < 1e-6 and abs(got.grad_norm - expected.grad_norm) < 1e-6


def test_generate_streams_and_stops(tiny_model_dir):
    be = load_mlx(config(), tiny_model_dir, train=False)
    seen = []
    out = be.generate([1, 2, 3, 4], 6, on_token=seen.append)
    assert out == seen and len(out) == 6 and all(isinstance(t, int) for t in out)
    assert be.generate([1, 2, 3, 4], 6, stop_ids={out[0]}) == []
    # greedy generation follows the model's own argmax
    logits = be.model(mx.array([[1, 2, 3, 4]]))[0, -1]
    assert out[0] == int(mx.argmax(logits).item())
    assert be.sequence_logprobs(collate(samples(), 2))[0] < 0


def _variant(src, tmp_path, **edit):
    dst = tmp_path / "variant"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edit)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, words", [
    ({"model_type": "gpt2"}, ["architecture 'gpt2'", "not supported"]),
    ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, ["mode 'mxfp4'"]),
    ({"quantization": {"group_size": 32, "bits": 7}}, ["7 bits"]),
    ({"quantization_config": {"quant_method": "gptq"}}, ["'gptq'"]),
])
def test_unsupported_models_fail_in_one_line(tiny_model_dir, tmp_path, edit, words):
    from mlxft.backends.mlx_backend import MLXBackend

    be = MLXBackend(config())
    with pytest.raises(ModelError) as exc:
        be.load(_variant(tiny_model_dir, tmp_path, **edit))
    msg = exc.value.message
    assert "\n" not in msg and all(w in msg for w in words)
    assert be.model is None


def test_learning_rate_is_applied_per_step(tiny_model_dir):
    """The compiled step reads the rate set for each step (the shared warmup/cosine schedule)."""
    from mlx.utils import tree_flatten

    be = load_mlx(config(), tiny_model_dir)
    batch = collate(samples(), 2)

    def params():
        return {k: np.array(v) for k, v in tree_flatten(be.model.trainable_parameters())}

    start = params()
    be.train_step([batch], 0.0)
    assert all(np.array_equal(start[k], v) for k, v in params().items())
    be.train_step([batch], 1e-2)
    assert any(not np.array_equal(start[k], v) for k, v in params().items())
