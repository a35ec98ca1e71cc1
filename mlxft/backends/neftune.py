"""NEFTune: uniform noise on the input embeddings while training (train.neftune_alpha).

Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning" (2023), Algorithm 1:
each training forward pass adds noise drawn uniformly from [-1, 1] and scaled by
alpha / sqrt(L * d) to the embeddings of a batch, L its sequence length and d the embedding
width; evaluation and generation see the embeddings unchanged. Like transformers' and TRL's
implementation, L is the padded length of the batch (the tensor's sequence dimension), and the
noise is added to what the model's input-embedding module returns (for Gemma that is the
embedding already multiplied by sqrt(d), as in transformers).

The PyTorch backend adds it with a forward hook on the input embeddings that acts only while
the module is in training mode, so validation, retention scoring and generation (all run in
eval mode) are noise-free.
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
