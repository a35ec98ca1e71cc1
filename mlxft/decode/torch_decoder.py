"""Continuous batching on PyTorch with a transformers DynamicCache (of in-place GrowingLayers).

Rows are left-padded to a shared cache length T: row i's real tokens fill the last `length_i`
columns, the 2-D attention mask zeroes the padding, and each row's position id is its own
length, so every row computes what it would alone. Sequences that wait are prefilled together
(left-padded, up to a token budget; the prompt cache may supply each one's prefix) and then join
the batch: the shorter side is left-padded with zero keys and values and the tensors are
concatenated on the batch axis. A finished or cancelled row is dropped with an index select, and
columns that are padding in every remaining row are cut, so T follows the longest live row.

Exactness: masked columns get softmax weight exactly 0 and their values are zero (the keys and
values a prefill computes at padding positions are zeroed), so padding changes no term of a
row's attention sum, only the shapes of the matmuls (a batch of B rows against one). BLAS may
then add in another order, so float32 logits can differ in the last bits from a row run alone;
greedy argmax identity is what the tests check on a tiny model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from mlxft.decode.base import Event, SeqRequest
from mlxft.decode.kv_layer import growing_cache
from mlxft.decode.prefix_cache import PrefixCache
from mlxft.decode.sampling import RowSampler, choose

# Padded tokens (rows x the longest row's new tokens) one prefill pass may compute. Prompts beyond
# it wait for the next step; a single longer prompt is prefilled alone.
PREFILL_TOKENS = 2048


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
        self._looked: dict[int, tuple] = {}  # prompt-cache lookups of sequences left for the next prefill
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "steps": 0, "prefills": 0}

    def __len__(self) -> int:
        return len(self.pending) + len(self.rows)

    def insert(self, request: SeqRequest) -> None:
        self.pending.append(request)

    def remove(self, uids) -> None:
        uids = set(uids)
        self.pending = [r for r in self.pending if r.uid not in uids]
        for uid in uids & self._looked.keys():
            del self._looked[uid]
        keep = [i for i, row in enumerate(self.rows) if row.uid not in uids]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def retarget(self, model, cache_key: str) -> None:
        """Decode with `model` (the same base with another adapter switched in) from now on;
        called between batches, when no row is running."""
        self.model, self.cache_key = model, cache_key
        self._looked.clear()

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
        """Prefill the waiting sequences (together, up to PREFILL_TOKENS), or, when none waits,
        decode one token for every row. Prefilling before decoding hands each new sequence its
        first token as soon as its prompt is done (prefill-first, as vLLM schedules without
        chunked prefill); running rows pause meanwhile. Prompts that arrive together share one
        forward pass: with 8 at once the last one no longer waits for 7 prefills before its own."""
        with self.torch.inference_mode():
            if self.pending:
                return self._prefill(self._take_pending())
            return self._decode() if self.rows else []

    def _take_pending(self) -> list[tuple[SeqRequest, list, int]]:
        """The oldest waiting sequences whose padded prefill fits PREFILL_TOKENS (at least one),
        each with the prompt-cache prefix it starts from: (request, prefix layers, its length)."""
        taken, widest = [], 0
        while self.pending:
            request = self.pending[0]
            found = self._looked.pop(request.uid, None) or self._lookup(request.prompt)
            wider = max(widest, len(request.prompt) - found[1])
            if taken and wider * (len(taken) + 1) > PREFILL_TOKENS:
                self._looked[request.uid] = found  # kept for the next step's batch
                break
            taken.append((self.pending.pop(0), *found))
            widest = wider
        return taken

    def _lookup(self, prompt: list[int]) -> tuple[list | None, int]:
        if self.prefix_cache is None:
            return None, 0
        return self.prefix_cache.lookup(self.cache_key, prompt)

    def _forward(self, ids, cache, attention_mask=None, position_ids=None):
        # The last position by index, not `logits_to_keep=1`: that slices the hidden states to a
        # non-contiguous [B, 1, H] view, and torch 2.13's bf16 linear on CPU then copies the head
        # weight once per row (SmolLM2, 32 rows: +1.6 GB; Gemma's 262k-word head: 335 MB a row).
        # Indexing gives a contiguous copy of B x H values.
        last = self.torch.tensor([ids.shape[1] - 1], device=ids.device)
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=last, **{self._cache_arg: cache})
        return out.logits[:, -1, :]

    def _prefill(self, taken: list[tuple[SeqRequest, list, int]]) -> list[Event]:
        """One forward pass over the new tokens of every taken sequence. Rows are right-aligned:
        each computes the last `new` tokens of its prompt (`new`: the most any row has beyond its
        cached prefix, so a row with fewer recomputes the end of its prefix and none has padding
        between its cached and its computed tokens), takes the rest from its prompt-cache prefix,
        and a prompt shorter than `new` is left-padded."""
        torch = self.torch
        requests = [request for request, _, _ in taken]
        lengths = [len(request.prompt) for request in requests]
        new = max(length - start for length, (_, _, start) in zip(lengths, taken))
        reused = [max(0, length - new) for length in lengths]     # cached columns each row keeps
        width = max(reused)
        cache = growing_cache(_stack_prefixes([prefix for _, prefix, _ in taken], reused, width))
        pad_id = 0
        ids = torch.tensor([[pad_id] * (new - (n - r)) + request.prompt[r:]
                            for request, n, r in zip(requests, lengths, reused)], device=self.device)
        mask = torch.tensor([[0] * (width + new - n) + [1] * n for n in lengths], dtype=torch.long, device=self.device)
        positions = (torch.arange(new, device=self.device)[None]
                     + torch.tensor(lengths, device=self.device)[:, None] - new).clamp(min=0)
        logits = self._forward(ids, cache, attention_mask=mask if len(taken) > 1 else None, position_ids=positions)
        if len(taken) > 1:
            for layer in cache.layers:  # padding positions' keys and values: zero, as _join pads
                layer.keys.mul_(mask[:, None, :, None])
                layer.values.mul_(mask[:, None, :, None])
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += sum(n - r for n, r in zip(lengths, reused))
        self.stats["cached_tokens"] += sum(reused)
        if self.prefix_cache is not None:
            for i, (request, n) in enumerate(zip(requests, lengths)):
                self.prefix_cache.insert(self.cache_key, request.prompt,
                                         [(k[i:i + 1, :, -n:], v[i:i + 1, :, -n:]) for k, v in _layers(cache)])
        samplers = [RowSampler(r.temperature, r.top_p, r.seed) for r in requests]
        tokens = choose(logits.float(), samplers)
        events, joining = [], []
        for request, sampler, token in zip(requests, samplers, tokens):
            if token in request.stop_ids:
                events.append(Event(request.uid, None, "stop"))
            elif request.max_tokens <= 1:
                events.append(Event(request.uid, token, "length"))
            else:
                events.append(Event(request.uid, token))
                joining.append(_Row(request.uid, sampler, request.stop_ids, request.max_tokens, token,
                                    list(request.prompt)))
        if joining:
            keep = [i for i, event in enumerate(events) if event.finish is None]
            if len(keep) < len(taken):
                mask = _take_rows(cache, mask, keep)
            self._join(cache, mask)
            self.rows.extend(joining)
        return events

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

    def _join(self, cache, mask) -> None:
        """Add a prefilled cache (its rows' [k, width] mask beside it) as new last rows."""
        torch = self.torch
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        width, length = self.mask.shape[1], mask.shape[1]
        grow, pad = max(0, length - width), max(0, width - length)
        for layer, (k, v) in zip(self.cache.layers, _layers(cache)):
            layer.adopt(torch.cat([_pad_left(layer.keys, grow), _pad_left(k, pad)], dim=0),
                        torch.cat([_pad_left(layer.values, grow), _pad_left(v, pad)], dim=0))
        self.mask = torch.cat([_pad_left(self.mask, grow), _pad_left(mask, pad)], dim=0)

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        self.mask = _take_rows(self.cache, self.mask, keep)

    def _remember(self, i: int) -> None:
        """Offer a finished row's whole conversation to the prompt cache (a chat's next turn
        resends it)."""
        if self.prefix_cache is None:
            return
        n = len(self.rows[i].fed)
        layers = [(layer.keys[i:i + 1, :, -n:], layer.values[i:i + 1, :, -n:]) for layer in self.cache.layers]
        self.prefix_cache.insert(self.cache_key, self.rows[i].fed, layers)


def _take_rows(cache, mask, keep: list[int]):
    """Keep rows `keep` of a batch cache and cut the columns that are padding in all of them;
    returns their mask."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    live = mask.any(0).nonzero()
    cut = int(live[0]) if len(live) else 0
    for layer in cache.layers:
        layer.adopt(layer.keys[index, :, cut:], layer.values[index, :, cut:])
    return mask[:, cut:]


def _stack_prefixes(prefixes: list, reused: list[int], width: int):
    """Per layer, the rows' cached prefixes cut to their first `reused[i]` columns and left-padded
    with zeros to `width` (None when no row reuses any)."""
    if width == 0:
        return None
    import torch

    template = next(p for p, r in zip(prefixes, reused) if r)
    stacked = []
    for layer, (k0, v0) in enumerate(template):
        keys, values = [], []
        for prefix, r in zip(prefixes, reused):
            k, v = prefix[layer] if r else (k0[:, :, :0], v0[:, :, :0])
            keys.append(_pad_left(k[:, :, :r], width - r))
            values.append(_pad_left(v[:, :, :r], width - r))
        stacked.append((torch.cat(keys), torch.cat(values)))
    return stacked


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
