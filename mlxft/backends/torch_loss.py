"""The training loss's fused LM head: the log-probability of each target (the SFT loss is minus
their sum, the preference step sums them per answer), with the gradient to the hidden states
computed in the forward, chunk by chunk, as Liger's and Unsloth's fused linear cross-entropy do.

The plain path (TorchBackend._target_logp, where the head is not fusable) runs `lm_head`, casts
the logits to f32, and lets autograd keep what `log_softmax` and `nll_loss` need; with more than
one chunk under autograd it checkpoints each and recomputes the head's matmul in the backward.
Its elementwise work over the (targets x vocabulary) logits is the log-softmax forward, its
backward and the casts between them. Here each chunk's logits are used once while they are in
cache-sized memory:

    z = h @ W.T (f32)     m = max z     e = exp(z - m)     s = sum e
    loss = m + log s - z[y]
    dL/dh = (e / s - onehot(y)) @ W

so one exponential pass serves the loss and its gradient, the head's matmul is never recomputed,
and the backward only scales each stored row of dL/dh by its position's incoming gradient. The
matmuls run in the same dtype as the plain path's (the autocast dtype when autocast is on, else
the weight's).

It applies where it is the same computation: the head is frozen and has no bias, and no final
logit soft-capping (Gemma 2); elsewhere the plain path runs.
"""

from __future__ import annotations


def fusable_head(head, cap) -> bool:
    """Whether the fused loss computes exactly what the plain path does for this head."""
    weight = getattr(head, "weight", None)
    return (weight is not None and not weight.requires_grad and getattr(head, "bias", None) is None
            and not cap)


def _matmul_dtype(hidden, weight):
    import torch

    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _make_function():
    import torch

    class FusedLinearLogProb(torch.autograd.Function):
        """Per position, log softmax(`hidden @ weight.T`) at `labels` (or its soft-target sum)."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, soft_p):
            dtype = _matmul_dtype(hidden, weight)
            w = weight.to(dtype)
            grad = torch.empty_like(hidden) if hidden.requires_grad else None
            logp = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
            with torch.autocast(hidden.device.type, enabled=False):
                for i in range(0, hidden.shape[0], chunk):
                    h, y = hidden[i:i + chunk].to(dtype), labels[i:i + chunk]
                    z = (h @ w.T).float()
                    if soft_p is None:
                        target = z.gather(1, y[:, None])[:, 0]
                    else:  # soft targets: sum_j p_j log softmax(z)[y_j]
                        p = soft_p[i:i + chunk]
                        mass = p.sum(dim=1)
                        target = (z.gather(1, y) * p).sum(dim=1)
                    m = z.amax(dim=-1, keepdim=True)
                    z.sub_(m).exp_()
                    s = z.sum(dim=-1, keepdim=True)
                    log_norm = m[:, 0] + s[:, 0].log()
                    logp[i:i + chunk] = target - (log_norm if soft_p is None else log_norm * mass)
                    if grad is not None:  # d logp / dh = (onehot(y) - softmax) @ W; soft: (p - mass softmax) @ W
                        z.div_(s).neg_()
                        if soft_p is None:
                            z[torch.arange(z.shape[0], device=z.device), y] += 1
                        else:
                            z.mul_(mass[:, None]).scatter_add_(1, y, p)
                        grad[i:i + chunk] = (z.to(dtype) @ w).to(hidden.dtype)
            ctx.save_for_backward(grad)
            return logp

        @staticmethod
        def backward(ctx, grad_logp):
            (grad,) = ctx.saved_tensors
            return grad * grad_logp.to(grad.dtype)[:, None], None, None, None, None

    return FusedLinearLogProb


_FUNCTION = None


def fused_linear_logp(hidden, weight, labels, chunk: int, soft_p=None):
    """Per position log-probability of `labels` under softmax(hidden @ weight.T), f32; see the
    module docstring. With `soft_p` ((N, k), labels (N, k)), the soft-target form:
    sum_j soft_p[:, j] * log p(labels[:, j]), whose negation is the cross-entropy against that
    distribution (distillation). Each position's value depends on its own hidden state only, so the stored
    gradient row times the incoming gradient of that position is the exact backward."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    return _FUNCTION.apply(hidden, weight, labels, chunk, soft_p)

