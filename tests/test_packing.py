"""PyTorch backend speed paths keep the numerics: a packed batch gives each sample the loss it gets
alone (to 1e-4, with eager and with SDPA attention), bf16 autocast stays close to f32, and the
MFU estimate has the documented form."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROWS = [{"messages": [{"role": "user", "content": "Say something " + "very " * (i % 5) + f"short {i}."},
                      {"role": "assistant", "content": " ".join(["word"] * (3 + 4 * i)) + "."}]}
        for i in range(6)]


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    import torch

    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.data import load_dataset

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build_config(None, ["train.dtype=float32", "retention.enabled=false", "lora.rank=4"],
                       {"model": str(tiny_model_dir), "data": {"train": str(data)}})
    backend = TorchBackend(cfg)
    backend.load(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    samples = load_dataset(data, backend.tokenizer, 256).samples
    return backend, samples


def per_sample_losses(backend, batch) -> dict[tuple, float]:
    """Mean target loss per (row, segment): segment 1 for unpacked rows."""
    import torch

    with torch.no_grad(), backend._compute():
        hidden, labels = backend._hidden(batch)
        head, cap = backend._head()
        tok = torch.nn.functional.cross_entropy(backend._chunk_logits(hidden, head, cap), labels, reduction="none")
    mask = batch.loss_mask[:, 1:].astype(bool)
    rows = np.nonzero(mask)[0]
    seg = batch.segment_ids[:, 1:][mask] if batch.segment_ids is not None else np.ones_like(rows)
    out: dict[tuple, list] = {}
    for r, s, v in zip(rows, seg, tok.tolist()):
        out.setdefault((int(r), int(s)), []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


@pytest.mark.parametrize("eager_max", [10 ** 6, 0], ids=["eager", "sdpa"])
def test_packed_losses_equal_one_by_one(setup, monkeypatch, eager_max):
    from mlxft.backends import torch_backend
    from mlxft.data import collate, pack

    monkeypatch.setattr(torch_backend, "EAGER_ATTENTION_MAX_LEN", eager_max)
    backend, samples = setup
    alone = [per_sample_losses(backend, collate([s], backend.tokenizer.pad_token_id))[(0, 1)] for s in samples]
    longest = max(len(s) for s in samples)
    batch = pack(samples, backend.tokenizer.pad_token_id, max_len=2 * longest)
    assert batch.input_ids.shape[0] < len(samples)  # several samples really share a row
    packed = per_sample_losses(backend, batch)
    # pack() places samples longest first; recover which sample is in which (row, segment)
    for (r, s), loss in packed.items():
        ids = batch.input_ids[r][batch.segment_ids[r] == s].tolist()
        k = next(i for i, smp in enumerate(samples) if smp.ids == ids)
        # same tokens, other batch shape: float32 rounding (~1e-5 nats, see test_eval.py's note);
        # attention leaking across packed samples changes a sample's whole context
        assert loss == pytest.approx(alone[k], abs=1e-4)
    assert len(packed) == len(samples)


def test_packed_step_matches_padded_step(setup):
    from mlxft.data import collate, pack

    backend, samples = setup
    pad = backend.tokenizer.pad_token_id
    a = backend.eval_batch(collate(samples, pad))
    b = backend.eval_batch(pack(samples, pad, max_len=128))
    assert a.n_targets == b.n_targets
    assert a.loss_sum / a.n_targets == pytest.approx(b.loss_sum / b.n_targets, abs=1e-4)  # as above


def test_bf16_autocast_close_to_f32(tiny_model_dir, setup):
    import torch

    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.data import collate

    backend, samples = setup
    batch = collate(samples, backend.tokenizer.pad_token_id)
    ref = backend.eval_batch(batch)
    cfg = backend.cfg
    cfg.train.dtype = "bfloat16"
    low = TorchBackend(cfg)
    low.load(tiny_model_dir)
    state = {k: v for k, v in backend.model.state_dict().items() if "lora_" in k}
    low.model.load_state_dict(state, strict=False)
    assert all(p.dtype == torch.float32 for p in low.model.parameters() if p.requires_grad)  # f32 masters
    got = low.eval_batch(batch)
    # bf16 keeps 8 bits of mantissa (unit roundoff 2**-9 = 2e-3 per rounding); each matmul
    # rounds its inputs, and a 2-layer model has ~15 of them in a row: sqrt(15) * 2e-3 = 0.8%
    # relative on the logits, and the loss moves less. 2% leaves 2.5x; a bf16 master copy of the
    # LoRA weights or a lost adapter would not show here (that is the next assertions' job).
    assert got.loss_sum / got.n_targets == pytest.approx(ref.loss_sum / ref.n_targets, rel=2e-2)
    step = low.train_step([batch], lr=1e-3)
    assert step.finite and all(p.grad is None for p in low.model.parameters())


def test_mfu_estimate(setup):
    from mlxft import progress

    backend, _ = setup
    lm = backend._causal_lm()
    h, i, n = lm.config.hidden_size, lm.config.intermediate_size, lm.config.num_hidden_layers
    kv = lm.config.num_key_value_heads * (h // lm.config.num_attention_heads)
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i
    r = backend.cfg.lora.rank  # LoRA on q, k, v, o, gate, up, down: r x (in + out) weights each
    lora_per_block = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    # all blocks adapted: forward 2N + backward to activations 2N, and 6 x the LoRA weights
    expected = 4 * n * per_block + 6 * n * lora_per_block
    assert backend.flops_per_token() == expected
    per_token, device_flops = backend.model_flops()  # what the trainer hands the progress display
    assert per_token == expected and device_flops > 0
    assert progress.mfu(100.0, 4e8, 1e11) == pytest.approx(0.4)
    assert progress.mfu(100.0, None, 1e11) is None
