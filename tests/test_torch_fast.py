"""The PyTorch step's fast paths (mlxft/backends/torch_fast.py) on a tiny model: the fused LoRA
forward and the compiled blocks give the plain step's loss and LoRA gradients, and a change of
batch shape does not compile again."""

import json

import numpy as np
import pytest

from mlxft.config import build_config
from tests.helpers.data import ROWS

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

# Float32 tolerances. Both paths compute the same sums in a different order (addmm's fused
# scale-and-add; inductor's fused kernels and reduction order), so each product and reduction may
# differ by a few units of float32 rounding, eps = 1.2e-7 relative. Through 2 blocks (~10 ops
# deep, each at most doubling a relative error in the worst case of a cancelling sum: ~1e3 eps)
# that stays below 1e-4 relative; the loss (mean of ~100 cross-entropies of about ln(49152) = 11)
# and the gradient vector (compared by norm of the difference over norm) are held to that.
RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def backend_for(model_dir, data_file, fresh=False, **sets):
    from mlxft.backends.torch_backend import TorchBackend

    base = ["train.batch_size=4", "train.dtype=float32", "lora.rank=8", "lora.alpha=16", "lora.dropout=0",
            "retention.enabled=false"] + [f"{k}={v}" for k, v in sets.items()]
    cfg = build_config(None, base, {"model": str(model_dir), "data": {"train": str(data_file)}})
    b = TorchBackend(cfg)
    b.load(model_dir)
    if fresh:
        return b
    # PEFT starts lora_B at zero, which leaves lora_A's gradient zero; give B values (same seed,
    # so the same values in every backend built here) so both gradients are compared.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return b


def loss_and_grads(backend, batch):
    """The step's loss (sum over targets / targets) and the LoRA gradients, without an update."""
    backend.optimizer.zero_grad(set_to_none=True)
    with backend._compute():
        hidden, labels = backend._hidden(batch)
        loss = backend._loss_sum(hidden, labels, need_grad=True) / batch.n_targets
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in backend._trainable()])
    return float(loss.detach()), grads


def batches(backend, data_file, sizes=(4,)):
    from mlxft.data import collate, load_dataset

    ds = load_dataset(data_file, backend.tokenizer, 128)
    out, i = [], 0
    for n in sizes:
        out.append(collate(ds.samples[i:i + n], backend.tokenizer.pad_token_id))
        i += n
    return out


def assert_close(got, want):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert loss_a == pytest.approx(loss_b, rel=RTOL)
    assert float(grads_b.norm()) > 0
    assert float((grads_a - grads_b).norm() / grads_b.norm()) < RTOL


def test_fused_lora_step_equals_peft_forward(tiny_model_dir, data_file):
    b = backend_for(tiny_model_dir, data_file)
    fused = [m for m in b._tuner_layers if "forward" in vars(m)]
    assert len(fused) == len(b._tuner_layers) > 0
    batch = batches(b, data_file)[0]
    got = loss_and_grads(b, batch)
    for m in fused:
        del m.forward  # back to PEFT's own LoRA forward
    want = loss_and_grads(b, batch)
    assert_close(got, want)


def test_fused_forward_falls_back_where_it_is_not_the_same_computation(tiny_model_dir, data_file):
    from mlxft.backends.torch_fast import fusable

    dropout = backend_for(tiny_model_dir, data_file, **{"lora.dropout": 0.1})
    assert not any(fusable(m) for m in dropout._tuner_layers)
    dora = backend_for(tiny_model_dir, data_file, **{"lora.type": "dora"})
    assert not any(fusable(m) for m in dora._tuner_layers)


def test_compiled_step_equals_plain_step_and_does_not_recompile_per_shape(tiny_model_dir, data_file):
    """One compilation serves every block and batch shape (dynamic shapes), and gives the plain
    step's loss and LoRA gradients; a training step runs through it without compiling again."""
    from torch._dynamo.utils import counters

    plain = backend_for(tiny_model_dir, data_file)
    fast = backend_for(tiny_model_dir, data_file, **{"train.compile": "true"})
    assert fast._compiled_blocks == 2
    torch._dynamo.reset()
    counters.clear()
    first, second = batches(plain, data_file, sizes=(4, 3))
    assert_close(loss_and_grads(fast, first), loss_and_grads(plain, first))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    shapes = {first.input_ids.shape}
    for batch in (second, padded(first, 96), padded(second, 128)):  # new batch sizes and lengths
        assert_close(loss_and_grads(fast, batch), loss_and_grads(plain, batch))
        shapes.add(batch.input_ids.shape)
    fast.train_step([padded(second, 160)], lr=1e-3)
    assert len(shapes) == 4 and counters["stats"]["unique_graphs"] == graphs, (graphs, counters["stats"])


def padded(batch, length):
    """`batch` with padding columns up to `length` (not attended to, not scored)."""
    extra = length - batch.input_ids.shape[1]
    return type(batch)(*(None if a is None else np.pad(a, ((0, 0), (0, extra)))
                         for a in (batch.input_ids, batch.attention_mask, batch.loss_mask,
                                   batch.position_ids, batch.segment_ids)))


def test_no_gradient_flows_below_the_lowest_adapted_block(tiny_model_dir, data_file):
    """With LoRA on the last block only, nothing below it is part of the backward graph."""
    b = backend_for(tiny_model_dir, data_file, **{"lora.layers": 1})
    blocks = b._causal_lm().model.layers
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).requires_grad)) for i, blk in enumerate(blocks)]
    try:
        loss_and_grads(b, batches(b, data_file)[0])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {0: False, 1: True}


def _plain_loss_sum(backend, hidden, labels):
    """The unfused head and cross-entropy (TorchBackend._loss_sum's plain path)."""
    from mlxft.backends import torch_backend

    real = torch_backend.fusable_head
    torch_backend.fusable_head = lambda head, cap: False
    try:
        return backend._loss_sum(hidden, labels, need_grad=True)
    finally:
        torch_backend.fusable_head = real


def _fused_head_case(seed=0, T=37, V=1000, d=24):
    gen = torch.Generator().manual_seed(seed)
    h64 = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=gen, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (T,), generator=gen)
    return gen, h64.float().double(), w64.float().double(), y  # exactly representable in f32


def _fused_head_bounds(h64, w64, y, incoming):
    """Rounding bounds for the fused head (Higham's gamma_n = n u / (1 - n u), u = 2**-24): each
    f32 logit z_tj is a d-term dot product, off by at most gamma_d * (|h_t| . |w_j|); the
    log-probability of a position (target - max - log-sum-exp over V terms) moves by at most
    twice the largest logit error plus gamma_V for the sum of V exponentials; the softmax entries
    are then off by at most that relative amount, and d logp_t/dh_t = (onehot - p_t) @ W adds a
    V-term sum: gamma_V * (|p_t - onehot| @ |W|), both scaled by the position's incoming
    gradient. Returns (per-position value bound, gradient bound, float64 gradient)."""
    T, d = h64.shape
    V = w64.shape[0]
    u = 2.0 ** -24
    gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
    logit_err = gamma(d) * (h64.abs() @ w64.abs().T)  # (T, V)
    per_position = 2 * logit_err.amax(dim=1) + gamma(V)
    probs = torch.softmax(h64 @ w64.T, dim=1)
    residual = probs.clone()
    residual[torch.arange(T), y] -= 1
    grad_bound = incoming.abs()[:, None] * (
        (2 * per_position[:, None] * probs) @ w64.abs() + gamma(V) * (residual.abs() @ w64.abs()))
    return per_position, grad_bound, -incoming[:, None] * (residual @ w64)


def test_fused_cross_entropy_equals_float64_within_its_rounding():
    """The SFT loss (minus the summed log-probabilities): loss and gradient to the hidden states,
    over several chunks, against a float64 evaluation (bounds: _fused_head_bounds)."""
    from mlxft.backends.torch_loss import fused_linear_logp

    _, h64, w64, y = _fused_head_case()
    h = h64.float().requires_grad_()
    loss = -fused_linear_logp(h, w64.float(), y, chunk=8).sum()  # as TorchBackend._loss_sum
    (loss * 0.5).backward()  # the backward scales by the incoming gradient

    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, y, reduction="sum")
    per_position, grad_bound, want = _fused_head_bounds(h64, w64, y, torch.full((len(y),), -0.5, dtype=torch.float64))
    assert abs(float(loss.detach()) - float(ref)) <= float(per_position.sum())
    err = (h.grad.double() - want).abs()
    assert torch.all(err <= grad_bound), float((err / grad_bound).max())
    # the bound is tight enough to catch a real mistake: a gradient 1e-3 relative off fails it
    assert not torch.all((1e-3 * want).abs() <= grad_bound)
    assert float(want.norm()) > 0


def test_fused_logp_per_position_with_uneven_incoming_gradients():
    """The preference step's use: per-position log-probabilities, each position's gradient row
    scaled by its own incoming gradient (as the per-answer sums and the DPO loss weigh them),
    against float64 within the same bounds."""
    from mlxft.backends.torch_loss import fused_linear_logp

    gen, h64, w64, y = _fused_head_case(seed=1)
    incoming = torch.randn(len(y), generator=gen, dtype=torch.float64)
    h = h64.float().requires_grad_()
    logp = fused_linear_logp(h, w64.float(), y, chunk=8)
    (logp * incoming.float()).sum().backward()

    ref = torch.log_softmax(h64 @ w64.T, dim=1)[torch.arange(len(y)), y]
    per_position, grad_bound, want = _fused_head_bounds(h64, w64, y, incoming)
    assert logp.shape == (len(y),) and logp.dtype == torch.float32
    assert torch.all((logp.double() - ref).abs() <= per_position)
    err = (h.grad.double() - want).abs()
    assert torch.all(err <= grad_bound), float((err / grad_bound).max())
    # a backward that ignored the per-position weights (their mean instead) fails the bound
    flat = _fused_head_bounds(h64, w64, y, incoming.mean().expand(len(y)))[2]
    assert not torch.all((flat - want).abs() <= grad_bound)


def test_fused_loss_step_equals_the_plain_head(tiny_model_dir, data_file):
    """Through the backend: the fused head's loss and LoRA gradients equal the plain path's (the
    same sums in another order; RTOL above)."""
    b = backend_for(tiny_model_dir, data_file)
    head, cap = b._head()
    from mlxft.backends.torch_loss import fusable_head

    assert fusable_head(head, cap)
    batch = batches(b, data_file)[0]
    got = loss_and_grads(b, batch)
    b.optimizer.zero_grad(set_to_none=True)
    with b._compute():
        hidden, labels = b._hidden(batch)
        loss = _plain_loss_sum(b, hidden, labels) / batch.n_targets
        loss.backward()
    want = float(loss.detach()), torch.cat([p.grad.flatten() for p in b._trainable()])
    assert_close(got, want)


def test_fused_loss_falls_back_for_a_trainable_or_capped_head():
    from mlxft.backends.torch_loss import fusable_head

    head = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    assert fusable_head(head, None)
    assert not fusable_head(head, 30.0)  # Gemma 2's final_logit_softcapping
    assert not fusable_head(head.requires_grad_(True), None)
    assert not fusable_head(torch.nn.Linear(4, 10).requires_grad_(False), None)  # a bias


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fresh_adapter_runs_as_the_base_with_the_same_bits(tiny_model_dir, data_file, monkeypatch, dtype):
    """Before training, scoring and generation skip the all-zero LoRA path: same scores and
    answers as running it, and training afterwards still reaches the adapter."""
    import contextlib

    import mlxft.backends.torch_inference as inference

    b = backend_for(tiny_model_dir, data_file, fresh=True, **{"train.dtype": dtype})
    batch = batches(b, data_file)[0]
    prompts = [[int(t) for t in batch.input_ids[i][:12]] for i in range(3)]
    with b._inference():
        assert all(m.disable_adapters for m in b._tuner_layers)
    skipped = ([(r.loss_sum, r.n_correct) for r in b.row_scores(batch)], b.generate_batch(prompts, 12))
    monkeypatch.setattr(inference, "fresh_lora_skipped", lambda layers: contextlib.nullcontext())
    run = ([(r.loss_sum, r.n_correct) for r in b.row_scores(batch)], b.generate_batch(prompts, 12))
    assert skipped == run
    monkeypatch.undo()
    assert not any(m.disable_adapters for m in b._tuner_layers)
    assert all(p.requires_grad for p in b._trainable())
    loss_and_grads(b, batch)
    assert all(p.grad is not None for n, p in b.model.named_parameters() if "lora_B" in n)


def test_trained_or_dora_adapter_is_never_skipped(tiny_model_dir, data_file):
    trained = backend_for(tiny_model_dir, data_file)
    dora = backend_for(tiny_model_dir, data_file, fresh=True, **{"lora.type": "dora"})
    one = backend_for(tiny_model_dir, data_file, fresh=True)
    with torch.no_grad():
        next(p for n, p in one.model.named_parameters() if "lora_B" in n).view(-1)[0] = 1e-3
    for b in (trained, dora, one):
        with b._inference():
            assert not any(m.disable_adapters for m in b._tuner_layers)


def test_half_precision_batches_are_padded_to_a_few_shapes_without_changing_what_is_scored(tiny_model_dir, data_file):
    """In bf16 a batch is computed at a length rounded up to SEQ_BUCKET_HALF (oneDNN keeps a kernel
    per shape): the same targets in the same order, and the same bits as that batch padded by
    hand; float32 batches are computed at their own length."""
    from mlxft.backends.torch_device import SEQ_BUCKET_HALF

    b = backend_for(tiny_model_dir, data_file, **{"train.dtype": "bfloat16"})
    batch = batches(b, data_file)[0]
    length = batch.input_ids.shape[1]
    assert length % SEQ_BUCKET_HALF  # the case under test: a length off the bucket
    ids, attn, mask, _ = b._tensors(batch)
    bucket = -(-length // SEQ_BUCKET_HALF) * SEQ_BUCKET_HALF
    assert ids.shape[1] == attn.shape[1] == mask.shape[1] + 1 == bucket
    assert not attn[:, length:].any() and not mask[:, length - 1:].any()
    with torch.no_grad(), b._compute():
        _, labels = b._hidden(batch)
    assert labels.tolist() == batch.input_ids[:, 1:][batch.loss_mask[:, 1:].astype(bool)].tolist()

    by_hand = padded(batch, bucket)
    by_hand.input_ids[:, length:] = b.tokenizer.pad_token_id or 0
    rows = lambda x: [(r.loss_sum, r.n_targets, r.n_correct) for r in b.row_scores(x)]  # noqa: E731
    assert rows(batch) == rows(by_hand)
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(b, batch), loss_and_grads(b, by_hand)
    assert loss_a == loss_b and torch.equal(grads_a, grads_b) and float(grads_a.norm()) > 0

    f32 = backend_for(tiny_model_dir, data_file)
    assert f32._tensors(batch)[0].shape[1] == length
