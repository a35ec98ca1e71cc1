"""NEFTune: uniform noise on the input embeddings while training (train.neftune_alpha).

Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning" (2023), Algorithm 1:
each training forward pass adds noise drawn uniformly from [-1, 1] and scaled by
alpha / sqrt(L * d) to the embeddings of a batch, L its sequence length and d the embedding
width; evaluation and generation see the embeddings unchanged. Like transformers' and TRL's
implementation, L is the padded length of the batch (the tensor's sequence dimension), and the
noise is added to what the model's input-embedding module returns (for Gemma that is the
embedding already multiplied by sqrt(d), as in transformers).

The PyTorch backend adds it with a forward hook on the input embeddings; the MLX backend gives
the embedding module a subclass whose __call__ adds it (drawn from MLX's random state, which the
compiled training step carries). Both act only while the module is in training mode, so
validation, retention scoring and generation (all run in eval mode) are noise-free. mlx-lm's
Gemma models multiply the embeddings by sqrt(d) after the embedding module, so there the noise
is divided by that factor first: the same noise as transformers adds after its scaled embedding.
"""

from __future__ import annotations

import math


def noise_bound(alpha: float, seq_len: int, dim: int) -> float:
    """The half-width of the uniform noise for one batch: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * dim)


def add_torch_hook(embedding, alpha: float):
    """Register the noise on a torch embedding module; returns the hook handle (remove() undoes it)."""

    def hook(module, inputs, output):
        if not module.training or alpha <= 0:
            return output
        bound = noise_bound(alpha, output.shape[-2], output.shape[-1])
        return output + output.new_empty(output.shape).uniform_(-bound, bound)

    return embedding.register_forward_hook(hook)


def add_mlx_noise(embedding, alpha: float, scale_after: float = 1.0) -> None:
    """Make an mlx.nn embedding module (plain or quantized) add the noise in training mode.
    `scale_after`: what the model multiplies the embeddings by after this module (Gemma: sqrt(d))."""
    import mlx.core as mx

    base = type(embedding)

    class NoisyEmbedding(base):
        def __call__(self, x):
            out = base.__call__(self, x)
            if not self.training or alpha <= 0:
                return out
            bound = noise_bound(alpha, out.shape[-2], out.shape[-1]) / scale_after
            return out + mx.random.uniform(-bound, bound, out.shape).astype(out.dtype)

    embedding.__class__ = NoisyEmbedding
