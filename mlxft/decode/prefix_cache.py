"""Prompt cache for the PyTorch decoder: the KV tensors of token sequences already computed (a
system prompt, a chat history resent each turn), keyed by the token ids, looked up by longest
common prefix, evicted least-recently-used past a byte bound. mlx-lm's LRUPromptCache does this
job for MLX (mlx_decoder.py); this is the same idea on transformers' per-layer tensors."""

from __future__ import annotations

from collections import OrderedDict

Layers = list[tuple]  # [(keys, values)] per layer, each [1, heads, length, head_dim]


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 8):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[tuple, tuple[Layers, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.tokens_saved = 0

    def lookup(self, key: str, tokens: list[int]) -> tuple[Layers | None, int]:
        """(per-layer KV of the first m tokens, m) for the longest cached prefix of `tokens` under
        `key` (the adapter: KV depends on the weights), at most len(tokens) - 1 so one token is
        left to compute the next-token logits from; (None, 0) below min_tokens."""
        best, best_n = None, 0
        for entry_key in self.entries:
            if entry_key[0] != key:
                continue
            n = _common_prefix(entry_key[1], tokens)
            if n > best_n:
                best, best_n = entry_key, n
        best_n = min(best_n, len(tokens) - 1)
        if best is None or best_n < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.tokens_saved += best_n
        layers = self.entries[best][0]
        return [(k[:, :, :best_n], v[:, :, :best_n]) for k, v in layers], best_n

    def insert(self, key: str, tokens: list[int], layers: Layers) -> None:
        if self.max_bytes <= 0 or len(tokens) < self.min_tokens:
            return
        entry_key = (key, tuple(tokens))
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return
        # an entry that is a prefix of the new one is redundant: the new one answers its lookups
        for old in [k for k in self.entries if k[0] == key and len(k[1]) <= len(tokens)
                    and tuple(tokens[:len(k[1])]) == k[1]]:
            self.nbytes -= self.entries.pop(old)[1]
        self.entries[entry_key] = ([(k.clone(), v.clone()) for k, v in layers], size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1][1]
