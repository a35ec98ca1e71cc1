"""Continuous batching on PyTorch with a transformers DynamicCache (of in-place GrowingLayers).

Rows are left-padded to a shared cache length T: row i's real tokens fill the last `length_i`
columns, the 2-D attention mask zeroes the padding, and each row's position id is its own
length, so every row computes what it would alone. A new sequence is prefilled alone (batch 1,
no padding; the prompt cache may supply its prefix) and then joins the batch: the shorter side
is left-padded with zero keys and values and the tensors are concatenated on the batch axis.
A finished or cancelled row is dropped with an index select, and columns that are padding in
every remaining row are cut, so T follows the longest live row.

Exactness: masked columns get softmax weight exactly 0 and their values are zero, so padding
changes no term of a row's attention sum, only the shapes of the matmuls (a batch of B rows
against one). BLAS may then add in another order, so float32 logits can differ in the last bits
from a row run alone; greedy argmax identity is what the tests check on a tiny model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from mlxft.decode.base import Event, SeqRequest
from mlxft.decode.kv_layer import growing_cache
from mlxft.decode.prefix_cache import PrefixCache
from mlxft.decode.sampling import RowSampler, choose


@dataclass
class _Row:
    uid: int
    sampler: RowSampler
    stop_ids: frozenset
    max_tokens: int
    next_token: int
    fed: list[int]                    # tokens whose keys and values are in the cache
    generated: int = 1


class TorchDecoder:
    def __init__(self, model, prefix_cache: PrefixCache | None = None, cache_key: str = ""):
        import torch

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix_cache = prefix_cache
        self.cache_key = cache_key        # the adapter in use (prompt-cache entries depend on it)
        self.pending: list[SeqRequest] = []
        self.rows: list[_Row] = []
        self.cache = None                 # DynamicCache of the batch, [B, heads, T, head_dim] per layer
        self.mask = None                  # [B, T] long, 1 on real tokens
        forward = inspect.signature(_causal_lm(model).forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "steps": 0}

    def __len__(self) -> int:
        return len(self.pending) + len(self.rows)

    def insert(self, request: SeqRequest) -> None:
        self.pending.append(request)

    def remove(self, uids) -> None:
        uids = set(uids)
        self.pending = [r for r in self.pending if r.uid not in uids]
        keep = [i for i, row in enumerate(self.rows) if row.uid not in uids]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def retarget(self, model, cache_key: str) -> None:
        """Decode with `model` (the same base with another adapter switched in) from now on;
        called between batches, when no row is running."""
        self.model, self.cache_key = model, cache_key

    def close(self) -> None:
        pass

    def kv_bytes_per_token(self) -> int:
        config = _causal_lm(self.model).config
        config = getattr(config, "text_config", None) or config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        size = next(self.model.parameters()).element_size()
        return 2 * config.num_hidden_layers * heads * head_dim * size

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Event]:
        """Prefill the oldest waiting sequence, or, when none waits, decode one token for every
        row. One prefill per step hands each new sequence its first token as soon as its own
        prompt is done, instead of after every prompt that arrived with it (with 4 requests at
        once, the last one's wait was the sum of all 4 prefills); running rows pause meanwhile,
        as under vLLM's prefill-first scheduling."""
        with self.torch.inference_mode():
            if self.pending:
                return self._prefill(self.pending.pop(0))
            return self._decode() if self.rows else []

    def _forward(self, ids, cache, attention_mask=None, position_ids=None):
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :]

    def _prefill(self, request: SeqRequest) -> list[Event]:
        torch = self.torch
        prompt = request.prompt
        prefix, start = (None, 0) if self.prefix_cache is None else self.prefix_cache.lookup(self.cache_key, prompt)
        cache = growing_cache(prefix)
        ids = torch.tensor([prompt[start:]], device=self.device)
        positions = torch.arange(start, len(prompt), device=self.device)[None]
        logits = self._forward(ids, cache, position_ids=positions)
        self.stats["prefill_tokens"] += len(prompt) - start
        self.stats["cached_tokens"] += start
        if self.prefix_cache is not None:
            self.prefix_cache.insert(self.cache_key, prompt, _layers(cache))
        sampler = RowSampler(request.temperature, request.top_p, request.seed)
        token = choose(logits.float(), [sampler])[0]
        if token in request.stop_ids:
            return [Event(request.uid, None, "stop")]
        if request.max_tokens <= 1:
            return [Event(request.uid, token, "length")]
        self._join(cache, len(prompt))
        self.rows.append(_Row(request.uid, sampler, request.stop_ids, request.max_tokens, token, list(prompt)))
        return [Event(request.uid, token)]

    def _decode(self) -> list[Event]:
        torch = self.torch
        rows = self.rows
        ids = torch.tensor([[row.next_token] for row in rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        positions = torch.tensor([[len(row.fed)] for row in rows], device=self.device)
        logits = self._forward(ids, self.cache, attention_mask=self.mask, position_ids=positions)
        self.stats["steps"] += 1
        tokens = choose(logits.float(), [row.sampler for row in rows])
        events, keep = [], []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.fed.append(row.next_token)
            row.generated += 1
            if token in row.stop_ids:
                events.append(Event(row.uid, None, "stop"))
            elif row.generated >= row.max_tokens:
                events.append(Event(row.uid, token, "length"))
            else:
                events.append(Event(row.uid, token))
                row.next_token = token
                keep.append(i)
                continue
            self._remember(i)
        if len(keep) < len(rows):
            self._keep(keep)
        return events

    # ------------------------------------------------------------------ the batch cache

    def _join(self, cache, length: int) -> None:
        """Add a prefilled batch-1 cache of `length` tokens as a new last row."""
        torch = self.torch
        new = _layers(cache)
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, torch.ones((1, length), dtype=torch.long, device=self.device)
            return
        width = self.mask.shape[1]
        grow, pad = max(0, length - width), max(0, width - length)
        for layer, (k, v) in zip(self.cache.layers, new):
            layer.adopt(torch.cat([_pad_left(layer.keys, grow), _pad_left(k, pad)], dim=0),
                        torch.cat([_pad_left(layer.values, grow), _pad_left(v, pad)], dim=0))
        row_mask = _pad_left(self.mask.new_ones((1, length)), pad)
        self.mask = torch.cat([_pad_left(self.mask, grow), row_mask], dim=0)

    def _keep(self, keep: list[int]) -> None:
        torch = self.torch
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        live = self.mask.any(0).nonzero()
        cut = int(live[0]) if len(live) else 0
        self.mask = self.mask[:, cut:]
        for layer in self.cache.layers:
            layer.adopt(layer.keys[index, :, cut:], layer.values[index, :, cut:])

    def _remember(self, i: int) -> None:
        """Offer a finished row's whole conversation to the prompt cache (a chat's next turn
        resends it)."""
        if self.prefix_cache is None:
            return
        n = len(self.rows[i].fed)
        layers = [(layer.keys[i:i + 1, :, -n:], layer.values[i:i + 1, :, -n:]) for layer in self.cache.layers]
        self.prefix_cache.insert(self.cache_key, self.rows[i].fed, layers)


def _layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(x, n: int):
    """Zero-pad the sequence axis of a [B, heads, T, dim] cache tensor or a [B, T] mask on the left."""
    if n <= 0:
        return x
    import torch

    shape = list(x.shape)
    axis = 2 if x.dim() == 4 else 1
    shape[axis] = n
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=axis)


def _causal_lm(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model
