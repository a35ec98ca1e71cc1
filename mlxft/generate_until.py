"""Greedy generation, side by side, where a row may end early on a rule of its own: the forgetting
guard's replay answers cut at their first sentence end stop being generated there, instead of
running to the token budget and being cut afterwards.

Each prompt is a request to the backend's continuous-batching decoder (mlxft.decode): rows run at
most `max_batch` at a time, a finished row's slot is refilled at the next token, and a row whose
tokens so far satisfy `until(ids)` is removed from the batch at once (its ids up to and including
the token that satisfied the rule are kept). The ids are exactly the prefix greedy decoding
without the rule would have produced, since removing a row does not change the other rows.

Backends without a decoder generate to the budget and the answer is cut at the same token.
"""

from __future__ import annotations

import contextlib
from typing import Callable


def generate_until(backend, prompts: list[list[int]], max_tokens: int, until: Callable[[list[int]], bool],
                   max_batch: int | None = None) -> list[tuple[list[int], str]]:
    """Greedy ids after each prompt (stop ids not included) and why the row ended: "until" (the
    rule held at its last token), "stop" (the model's own stop token) or "length" (the budget).
    `max_batch` defaults to the rows the backend's own generate_batch runs."""
    make = getattr(backend, "decoder", None)
    if make is None:
        return [_cut(ids, max_tokens, until) for ids in backend.generate_batch(prompts, max_tokens, temperature=0.0)]
    from mlxft.decode.base import SeqRequest

    max_batch = max_batch or backend.generate_rows
    stops = frozenset(backend.stop_ids())
    results: list[list[int]] = [[] for _ in prompts]
    ends: list[str] = ["length"] * len(prompts)
    waiting, running = list(range(len(prompts)))[::-1], set()
    decoder = make(max_batch=max_batch)
    try:
        with _inference(backend):
            while waiting or running:
                while waiting and len(running) < max_batch:
                    i = waiting.pop()
                    decoder.insert(SeqRequest(i, list(prompts[i]), max_tokens, 0.0, 1.0, None, stops))
                    running.add(i)
                ended = []
                for event in decoder.step():
                    if event.token is not None:
                        results[event.uid].append(event.token)
                    if event.finish is not None:
                        running.discard(event.uid)
                        ends[event.uid] = event.finish
                    if event.token is not None and until(results[event.uid]):
                        ends[event.uid] = "until"
                        if event.finish is None:
                            ended.append(event.uid)
                if ended:
                    decoder.remove(ended)
                    running.difference_update(ended)
    finally:
        if hasattr(decoder, "close"):
            decoder.close()
    return list(zip(results, ends))


def _cut(ids: list[int], max_tokens: int, until) -> tuple[list[int], str]:
    for n in range(1, len(ids) + 1):
        if until(ids[:n]):
            return list(ids[:n]), "until"
    return list(ids), "length" if len(ids) >= max_tokens else "stop"


def _inference(backend):
    """Eval mode and, on the PyTorch backend, no autograd graph (the decoder's own context)."""
    enter = getattr(backend, "_inference", None)
    if enter is not None:
        return enter()
    from mlxft.retention import _eval_mode

    return _eval_mode(backend) if hasattr(backend, "model") else contextlib.nullcontext()
