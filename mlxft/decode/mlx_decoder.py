"""Continuous batching on MLX with mlx-lm's own BatchGenerator (left-padded BatchKVCache, prompts
prefilled in chunks, rows joining and leaving at token boundaries) and its LRUPromptCache (KV
caches keyed by token prefix under a byte bound), as `mlx_lm.server` uses them. This module only
maps mlxft's requests onto them: per-row stop ids as StopSequences, per-row samplers (a seeded
one draws from its own key, so a seeded request repeats whichever rows share its batch)."""

from __future__ import annotations

from mlxft.decode.base import Event, SeqRequest


def seeded_sampler(temperature: float, top_p: float, seed: int):
    """mlx-lm's temperature/top-p sampling with its own random key instead of the global one."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    state = {"key": mx.random.key(seed)}

    def sample(logprobs):
        state["key"], key = mx.random.split(state["key"])
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=key)

    return sample


class MLXDecoder:
    def __init__(self, model, max_batch: int = 32, prompt_cache_bytes: int = 0, cache_key: str = ""):
        self.model, self.max_batch = model, max_batch
        self.cache_key = cache_key            # the adapter in use (prompt-cache entries depend on it)
        self.prompt_cache = None
        if prompt_cache_bytes > 0:
            from mlx_lm.models.cache import LRUPromptCache

            self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=prompt_cache_bytes)
        self._gen = None
        self._uids: dict[int, int] = {}       # BatchGenerator uid -> request uid
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "steps": 0}

    def _generator(self):
        if self._gen is None:
            import mlx.core as mx
            from mlx_lm.generate import BatchGenerator

            # created on the thread that steps it: MLX streams are per thread
            self._gen = BatchGenerator(self.model, completion_batch_size=self.max_batch,
                                       prefill_batch_size=min(8, self.max_batch),
                                       stream=mx.default_stream(mx.default_device()))
        return self._gen

    def __len__(self) -> int:
        return len(self._uids)

    def kv_bytes_per_token(self) -> int:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        probe = self.model(mx.array([[0]]), cache=cache)
        mx.eval(probe, [c.state for c in cache])
        # the cache allocates whole chunks of positions: divide by the positions allocated
        return max(1, sum(c.nbytes for c in cache) // max(1, cache[0].keys.shape[2]))

    def insert(self, request: SeqRequest) -> None:
        from mlx_lm.generate import StopSequences
        from mlx_lm.sample_utils import make_sampler

        gen = self._generator()
        prompt, cache, known = list(request.prompt), None, []
        if self.prompt_cache is not None:
            cache, rest = self.prompt_cache.fetch_nearest_cache(self.cache_key, prompt)
            if cache is not None and not rest:  # an exact hit: recompute the last token for its logits
                from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                    rest = prompt[-1:]
                else:
                    cache, rest = None, prompt
            known, prompt = request.prompt[:len(request.prompt) - len(rest)], rest
        self.stats["prefill_tokens"] += len(prompt)
        self.stats["cached_tokens"] += len(known)
        if request.temperature <= 0:
            sampler = None  # the generator's greedy sampler, one argmax over the batch
        elif request.seed is not None:
            sampler = seeded_sampler(request.temperature, request.top_p, request.seed)
        else:
            sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        (uid,) = gen.insert([prompt], max_tokens=[request.max_tokens], caches=[cache] if cache else None,
                            all_tokens=[known] if cache else None, samplers=[sampler],
                            stop_sequences=[StopSequences([[t] for t in sorted(request.stop_ids)] or None)])
        self._uids[uid] = request.uid

    def step(self) -> list[Event]:
        if not self._uids:
            return []
        _, responses = self._generator().next()
        self.stats["steps"] += 1
        events = []
        for r in responses:
            uid = self._uids[r.uid]
            if r.finish_reason is None:
                events.append(Event(uid, int(r.token)))
                continue
            del self._uids[r.uid]
            if self.prompt_cache is not None and r.prompt_cache is not None:
                self.prompt_cache.insert_cache(self.cache_key, list(r.all_tokens), r.prompt_cache)
            if r.finish_reason == "stop":
                events.append(Event(uid, None, "stop"))
            else:
                events.append(Event(uid, int(r.token), "length"))
        return events

    def remove(self, uids) -> None:
        uids = set(uids)
        mine = [g for g, u in self._uids.items() if u in uids]
        if mine:
            self._generator().remove(mine)
            for g in mine:
                del self._uids[g]

    def retarget(self, model, cache_key: str) -> None:
        """Decode with `model` (the same base with another adapter switched in) from now on;
        called between batches, when no row is running."""
        if model is not self.model:
            self.close()
        self.model, self.cache_key = model, cache_key

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
