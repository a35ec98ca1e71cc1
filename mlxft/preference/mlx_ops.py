"""The preference step on the MLX backend: per-answer summed log-probabilities of the
[chosen; rejected] batch (LM head only at target positions, as the SFT loss), the objective,
gradients by `nn.value_and_grad`, then the backend's own compiled update (clipping, AdamW, and
weights left untouched when the loss or gradient norm is not finite). The reference is the
model with its LoRA/DoRA layers swapped for the base layers they wrap (no weight copies)."""

from __future__ import annotations

import contextlib

import numpy as np

from mlxft.backends.base import StepResult
from mlxft.backends.common import eval_mode
from mlxft.preference.losses import MLXOps, Objective


def _inputs(backend, batch, count: bool = False):
    """The backend's bucketed arrays (labels and weights (targets, K): K = 1, or a replay row's
    soft targets with one-hot rows for the pairs) plus a (targets, rows) matrix that sums
    targets per row (zero for the bucket's padding targets)."""
    mx = backend.mx
    ids, seg, idx, labels, weights = backend._arrays(batch, count=count)
    n_rows, width = batch.input_ids.shape[0], ids.shape[1]
    rows = np.asarray(idx) // width
    real = np.asarray(weights).sum(-1, keepdims=True) > 0
    to_rows = (rows[:, None] == np.arange(n_rows)[None]).astype(np.float32) * real
    counts = batch.loss_mask[:, 1:].sum(-1).astype(np.float32)
    return ids, seg, idx, labels, weights, mx.array(to_rows), mx.array(counts)


def row_logps(backend, ids, seg, idx, labels, weights, to_rows):
    """Summed log-probability of each row's targets: sum_j w_j log p(label_j) per target."""
    from mlxft.backends.mlx_backend import LOSS_CHUNK

    mx = backend.mx
    h = mx.take(backend._hidden(ids, seg), idx, axis=0)
    parts = [-(backend._chunk_ce(h[i:i + LOSS_CHUNK], labels[i:i + LOSS_CHUNK])[0] * weights[i:i + LOSS_CHUNK]).sum(-1)
             for i in range(0, h.shape[0], LOSS_CHUNK)]
    return mx.concatenate(parts) @ to_rows


def pair_logps(backend, batch):
    """No-gradient, eval-mode (pc, pr, nc, nr) as float64 NumPy arrays."""
    mx = backend.mx
    with eval_mode(backend.model):
        ids, seg, idx, labels, weights, to_rows, counts = _inputs(backend, batch)
        sums = row_logps(backend, ids, seg, idx, labels, weights, to_rows)
        mx.eval(sums)
    n = batch.input_ids.shape[0] // 2
    s, c = np.array(sums, dtype=np.float64), np.array(counts, dtype=np.float64)
    return s[:n], s[n:], c[:n], c[n:]


@contextlib.contextmanager
def adapter_off(backend):
    from mlxft.backends.mlx_adapters import lora_modules, set_module

    layers = lora_modules(backend.model)
    for path, layer in layers.items():
        set_module(backend.model, path, layer.linear)
    try:
        yield
    finally:
        for path, layer in layers.items():
            set_module(backend.model, path, layer)


def train_step(backend, micro, lr: float, objective: Objective, counts) -> StepResult:
    """One optimizer step over `micro` (PairBatch items: chosen, rejected, then replay rows).
    `counts`: the whole step's pair, chosen-token and replay-token counts (trainer.StepCounts)."""
    mx = backend.mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    backend._build()
    backend.model.train()
    backend.optimizer.learning_rate = mx.array(lr, mx.float32)

    def loss_fn(_model, ids, seg, idx, labels, weights, to_rows, row_counts, ref, n):
        sums = row_logps(backend, ids, seg, idx, labels, weights, to_rows)
        loss = mx.array(0.0, mx.float32)
        if n:
            rc, rr = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
            loss, _, _ = objective.step_loss(MLXOps, sums[:n], sums[n:2 * n], row_counts[:n],
                                             row_counts[n:2 * n], rc, rr, counts.pairs, counts.chosen_tokens)
        if sums.shape[0] > 2 * n:
            loss = loss + objective.replay_loss(sums[2 * n:], counts.replay_tokens)
        return loss

    value_and_grad = nn.value_and_grad(backend.model, loss_fn)
    grads, loss_total = None, mx.array(0.0, mx.float32)
    for item in micro:
        ref = None if item.ref is None else mx.array(np.asarray(item.ref, dtype=np.float32))
        loss, g = value_and_grad(backend.model, *_inputs(backend, item.batch, count=True), ref,
                                 item.pairs_in_batch)
        grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        loss_total = loss_total + loss
        mx.eval(loss_total, grads)
    return backend.apply_gradients(grads, loss_total, counts.pairs)
