"""The preference step on the PyTorch backend: per-answer summed log-probabilities from one
forward of the [chosen; rejected] batch (the SFT loss's per-target log-probabilities,
TorchBackend._target_logp: the fused LM head where it applies), the objective, backward, the
same clipping, non-finite guard and all-reduce as the backend's SFT step; and the reference:
the same model with the adapter switched off (PEFT's disable_adapter), so no second copy of the
weights exists."""

from __future__ import annotations

import contextlib

from mlxft.backends.base import StepResult
from mlxft.preference.losses import Objective, TorchOps


def row_logps(backend, batch, need_grad: bool):
    """(summed log-probability of the targets per row, target count per row) as tensors. A
    replay row with soft targets (data.replay_distill) sums sum_j p_j log p(token_j) per target
    instead; the other rows of such a batch carry one-hot targets, which give exactly the hard
    figure (tests/test_replay_distill.py)."""
    torch = backend.torch
    hidden, labels = backend._hidden(batch)
    soft_ids, soft_p = backend._soft_targets(batch)
    logp = backend._target_logp(hidden, labels if soft_ids is None else soft_ids, need_grad, soft_p)
    rows = torch.from_numpy(batch.loss_mask[:, 1:]).bool().nonzero()[:, 0].to(backend.device)
    n_rows = batch.input_ids.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=backend.device).index_add(0, rows, logp.float())
    counts = torch.from_numpy(batch.loss_mask[:, 1:].sum(-1)).to(backend.device, torch.float32)
    return sums, counts


def pair_logps(backend, batch):
    """No-gradient, eval-mode (pc, pr, nc, nr) as float64 NumPy arrays."""
    with backend._inference(), backend._compute():
        sums, counts = row_logps(backend, batch, need_grad=False)
    n = sums.shape[0] // 2
    s, c = sums.double().cpu().numpy(), counts.double().cpu().numpy()
    return s[:n], s[n:], c[:n], c[n:]


@contextlib.contextmanager
def adapter_off(backend):
    """The base model alone, for the reference (LoRA and DoRA layers pass their input through)."""
    from peft import PeftModel

    if not isinstance(backend.model, PeftModel):
        yield
        return
    with backend.model.disable_adapter():
        yield


def backward(backend, micro, objective: Objective, n_pairs: int, n_chosen_tokens: int,
             n_replay_tokens: int = 0) -> float:
    """Gradients of this rank's share of the step loss into the trainable weights' .grad (added
    to what is there); the share's value. `micro`: PairBatch items (.batch: chosen, rejected,
    then replay rows; .ref (n, 2) or None; .pairs_in_batch n)."""
    torch = backend.torch
    loss_total = 0.0
    for item in micro:
        with backend._compute():
            sums, counts = row_logps(backend, item.batch, need_grad=True)
            n = item.pairs_in_batch
            loss = sums.new_zeros(())
            if n:
                rc = rr = None
                if item.ref is not None:
                    ref = torch.as_tensor(item.ref, dtype=torch.float32, device=backend.device)
                    rc, rr = ref[:, 0], ref[:, 1]
                loss, _, _ = objective.step_loss(TorchOps, sums[:n], sums[n:2 * n], counts[:n], counts[n:2 * n],
                                                 rc, rr, n_pairs, n_chosen_tokens)
            if sums.shape[0] > 2 * n:
                loss = loss + objective.replay_loss(sums[2 * n:], n_replay_tokens)
            loss.backward()
        loss_total += float(loss.detach())
    return loss_total


def train_step(backend, micro, lr: float, objective: Objective, counts) -> StepResult:
    """One optimizer step over `micro`, clipped, skipped when not finite, as the SFT step.
    `counts`: the whole step's pair, chosen-token and replay-token counts (trainer.StepCounts)."""
    for group in backend.optimizer.param_groups:
        group["lr"] = lr
    backend.optimizer.zero_grad(set_to_none=True)
    loss_total = backward(backend, micro, objective, counts.pairs, counts.chosen_tokens, counts.replay_tokens)
    return backend.apply_gradients(loss_total, counts.pairs)
