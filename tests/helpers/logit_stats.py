"""Comparing two evaluations of one model at the level the claims are about: mean KL between
next-token distributions, top-1 leads, and a simulation of llama.cpp's 8-bit activation
rounding, which gives quantized-kernel comparisons a bound derived from the rounding step itself
rather than read off one CPU, and the bound for two float32 evaluations of one model."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats at each position (rows of [T, vocab] logits), in float64."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    return float(kl_per_position(p_logits, q_logits).mean())


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """How far the top logit leads the runner-up at each position."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def f32_bound(ours: np.ndarray, exact: np.ndarray, longest_dot: int) -> float:
    """Largest |theirs - exact| allowed, where `theirs` is another float32 evaluation of the model
    that gave `ours` (float32) and `exact` (float64).

    Two float32 implementations (llama.cpp with F32 weights and an F32 KV cache, MLX, PyTorch) sum
    the same dot products (at most `longest_dot` terms) through the same layers; they differ only
    in summation order, FMA use, and a few ulp in exp/silu/RoPE-angle implementations (llama.cpp
    builds RoPE angles by repeated multiplication: at most p * max_i(i * theta_i) * 2**-24, about
    94 * 1 * 6e-8 = 6e-6 rad for SmolLM2's test sequence, negligible). Each therefore sits at a
    rounding distance of the same kind from the exact result. That distance is measured on the
    spot, e = max|ours - exact|, not read off a CPU; it is floored at the textbook one-dot-product
    estimate sqrt(n) * 2**-24 * max|logit| (n = longest_dot) in case this CPU's rounding happens
    to cancel. |theirs - exact| may reach e, doubled for summation orders that happen to align
    badly, and doubled again for the elementwise functions: 4 e. (Measured on an Intel Xeon,
    Sapphire Rapids, SmolLM2 through llama.cpp: e = 6.2e-5, |theirs - exact| = 4.8e-5, logits up
    to 41; the injected bugs in test_gguf_import.py move logits by 10 to 6500.)"""
    floor = np.sqrt(longest_dot) * 2.0**-24 * np.abs(exact).max()
    return 4 * max(float(np.abs(ours - exact).max()), floor)


def round_blocks_to_8bit(x, block: int = 32):
    """x rounded as ggml's Q8_0/Q8_1 do before a quantized matmul: per block of `block` values
    along the last axis, scale d = max|x| / 127 and x -> round(x / d) * d."""
    import torch

    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return (torch.round(blocks / safe) * d).reshape(shape)


@contextmanager
def q8_activations(model, block: int = 32):
    """Within the block, every nn.Linear of `model` sees its input rounded by
    `round_blocks_to_8bit`: what llama.cpp does to the activations that meet Q4_x/Q8_0 weights."""
    import torch

    def hook(_module, args):
        return (round_blocks_to_8bit(args[0], block), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.in_features % block == 0]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
