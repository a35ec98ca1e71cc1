"""Next-token choice per row for the PyTorch decoder: greedy rows share one argmax over the batch;
sampled rows draw with temperature and top-p from their own torch.Generator, so a seeded request
repeats whichever requests share its batch."""

from __future__ import annotations


class RowSampler:
    """One row's sampling settings and random generator."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature > 0 and seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def sample(self, logits):
        """A token id from one row of float32 logits."""
        import torch

        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the top token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose(logits, samplers: list[RowSampler]) -> list[int]:
    """The next token of every row of `logits` ([rows, vocab])."""
    picked = logits.argmax(-1).tolist()
    for i, sampler in enumerate(samplers):
        if not sampler.greedy:
            picked[i] = sampler.sample(logits[i].float())
    return picked
