"""MLX and PyTorch give the same DPO and ORPO loss on the same batch and adapter, and the MLX
reference (LoRA layers swapped for their base layers) equals the base model alone.

Tolerance: the two frameworks' float32 forwards of the tiny model differ per token log-probability
by at most about 1e-4 (the SFT parity test holds mean token losses within 1e-3; measured
differences are near 1e-5). A summed answer log-probability over at most 40 tokens is then within
4e-3 (LOGP_ATOL); the DPO margin combines four such sums times beta 0.1, 1.6e-3, and the loss moves
by at most that (LOSS_ATOL 2e-3); ORPO's per-token means are within 1e-4 and its NLL term too,
as are DPO's SFT term and the replay rows' NLL (per-token means as well).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.mlx import config, load_mlx, load_torch
from tests.helpers.preference import PAIRS, write_jsonl

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

LOGP_ATOL = 4e-3
LOSS_ATOL = 2e-3


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_mlx_equals_torch_on_the_same_batch_and_adapter(tiny_model_dir, tmp_path, lora_type):
    from mlxft.preference import mlx_ops, reference, torch_ops
    from mlxft.preference.data import collate_pairs, load_pairs
    from mlxft.preference.losses import Objective
    from mlxft.preference.trainer import PairBatch

    cfg = config(lora_type)
    cfg.train.max_grad_norm = 0.0
    # One adapter for both: random non-zero A and B written by the torch backend, read by MLX.
    tb = load_torch(cfg, tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tb.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tb.save_adapter(tmp_path / "adapter")
    mb = load_mlx(cfg, tiny_model_dir, adapter=tmp_path / "adapter", train=True)

    ds = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4]), tb.tokenizer, 128)
    batch = collate_pairs(ds.pairs, tb.tokenizer.pad_token_id)
    refs = {}
    for name, be in (("torch", tb), ("mlx", mb)):
        refs[name] = reference.compute(be, ds, batch_size=4, adapter_on=False)
    np.testing.assert_allclose(refs["mlx"], refs["torch"], rtol=0, atol=LOGP_ATOL)
    # The reference of each backend is its base model alone.
    base = load_mlx(config(lora_type), tiny_model_dir, train=False)
    pc, pr, _, _ = mlx_ops.pair_logps(base, batch)
    np.testing.assert_allclose(refs["mlx"], np.stack([pc, pr], 1), rtol=0, atol=1e-5)

    tuned = {name: ops.pair_logps(be, batch) for name, ops, be in (("torch", torch_ops, tb), ("mlx", mlx_ops, mb))}
    for a, b in zip(tuned["mlx"], tuned["torch"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=LOGP_ATOL)
    assert np.abs(tuned["torch"][0] - refs["torch"][:, 0]).max() > 0.05  # the adapter changes the policy

    from mlxft.preference.trainer import StepCounts

    n_chosen = int(sum(p.chosen.n_targets for p in ds.pairs))
    # Two NLL-only replay rows after the pairs (chosen answers of two other pairs stand in).
    replay = [p.chosen for p in load_pairs(write_jsonl(tmp_path / "more.jsonl", PAIRS[4:6]), tb.tokenizer, 128).pairs]
    with_replay = collate_pairs(ds.pairs, tb.tokenizer.pad_token_id, replay)
    counts = StepCounts(len(ds.pairs), n_chosen, sum(s.n_targets for s in replay))
    # The same replay rows trained as distillation (data.replay_distill): soft targets from the
    # base model's top 4, and one-hot soft targets, which must give the hard loss exactly.
    from dataclasses import replace

    from mlxft.replay_distill import teacher_targets_batch

    with_soft = collate_pairs(ds.pairs, tb.tokenizer.pad_token_id,
                              [replace(r, soft=t) for r, t in zip(replay, teacher_targets_batch(load_torch(cfg, tiny_model_dir), replay, 4))])
    one_hot = []
    for r in replay:
        ids, p = np.zeros((len(r.ids), 4), dtype=np.int64), np.zeros((len(r.ids), 4), dtype=np.float32)
        ids[:, 0], p[:, 0], ids[:, 1:] = r.ids, 1.0, 7
        one_hot.append(replace(r, soft=(ids, p)))
    with_one_hot = collate_pairs(ds.pairs, tb.tokenizer.pad_token_id, one_hot)
    cases = [("dpo", 0.0, batch), ("dpo", 1.0, batch), ("orpo", 0.0, batch), ("dpo", 0.5, with_replay),
             ("orpo", 0.0, with_replay), ("dpo", 0.5, with_soft), ("orpo", 0.0, with_soft),
             ("dpo", 0.5, with_one_hot), ("orpo", 0.0, with_one_hot)]
    seen = {}
    for method, sft_weight, b in cases:
        objective = Objective(method, beta=0.5, sft_weight=sft_weight)
        losses = {}
        for name, ops, be in (("torch", torch_ops, tb), ("mlx", mlx_ops, mb)):
            ref = refs[name] if method == "dpo" else None
            item = PairBatch(b, ref, n_pairs=len(ds.pairs))
            losses[name] = ops.train_step(be, [item], 0.0, objective, counts).loss
        assert abs(losses["mlx"] - losses["torch"]) < LOSS_ATOL, (method, sft_weight)
        seen[method, id(b)] = losses
        if method == "dpo" and b is batch and not sft_weight:
            assert abs(losses["torch"] - np.log(2)) > 10 * LOSS_ATOL  # not the trivial policy = reference value
        if b is not batch:  # the replay rows add their NLL (several nats per token on a random model)
            assert losses["torch"] > 1.0
    for method in ("dpo", "orpo"):
        hard, soft, ones = (seen[method, id(b)] for b in (with_replay, with_soft, with_one_hot))
        for name in ("torch", "mlx"):
            assert abs(ones[name] - hard[name]) < 1e-6, (method, name)  # one-hot soft = hard
            assert abs(soft[name] - hard[name]) > 10 * LOSS_ATOL, (method, name)  # the soft path is taken


def test_qlora_dpo_on_a_4bit_mlx_base(tiny_model_dir, tmp_path):
    """DPO over an MLX affine 4-bit base (QLoRA): the reference is the quantized base alone (the
    LoRA layers swapped for the QuantizedLinear they wrap), so the first step's loss is ln 2 up
    to float32 rounding of the log-ratios (beta x |sum| x eps ~ 0.1 x 300 x 1.2e-7 = 4e-6: 1e-5)."""
    import json

    from click.testing import CliRunner
    from mlx_lm import convert

    from mlxft.cli import cli

    qdir = tmp_path / "tiny-4bit"
    convert(str(tiny_model_dir), mlx_path=str(qdir), quantize=True, q_bits=4, q_group_size=32)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:8])
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(qdir), "--backend", "mlx", "--data", str(data),
                                   "--out", str(run), "--set", "train.method=dpo", "--set", "train.steps=2",
                                   "--set", "train.learning_rate=1e-2", "--set", "retention.enabled=false",
                                   "--set", "train.sft_weight=0", "--set", "data.replay=0",
                                   "--set", "train.batch_size=4", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["type"] == "train")
    assert abs(first["loss"] - np.log(2)) < 1e-5
    assert (run / "adapter-best" / "adapter_model.safetensors").is_file()
