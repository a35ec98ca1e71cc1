"""What a decoder takes and gives, and `generate_many`: a list of prompts through one decoder with
at most `max_batch` rows running at once (a finished row's slot is refilled at the next token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SeqRequest:
    uid: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None          # None: the framework's global generator
    stop_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Event:
    uid: int
    token: int | None                # None when the step ended the row on a stop id
    finish: str | None = None        # None (more to come) | "stop" | "length"


class Decoder(Protocol):
    def insert(self, request: SeqRequest) -> None:
        """Queue a sequence; it is prefilled and joins the batch at the next step()."""

    def step(self) -> list[Event]:
        """Advance: prefill inserted sequences (each event of a prefilled one is its first
        token) and/or decode one token for every running row. A finished row leaves the batch
        by itself; its event carries the finish reason."""

    def remove(self, uids: list[int]) -> None:
        """Drop rows (cancelled by their caller) and free their cache."""

    def __len__(self) -> int:
        """Rows running or waiting to be prefilled."""


def generate_many(decoder: Decoder, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, stop_ids=(), max_batch: int = 16, seed: int | None = None) -> list[list[int]]:
    """Generated ids for each prompt (stop ids not included), `max_batch` rows at a time with
    continuous refill. With a `seed`, prompt i samples from seed + i, so a prompt's answer does
    not depend on which others share its batch."""
    results: list[list[int]] = [[] for _ in prompts]
    if max_tokens <= 0 or not prompts:
        return results
    stops = frozenset(stop_ids)
    waiting = list(range(len(prompts)))[::-1]
    running = 0
    while waiting or running:
        while waiting and running < max_batch:
            i = waiting.pop()
            decoder.insert(SeqRequest(i, list(prompts[i]), max_tokens, temperature, top_p,
                                      None if seed is None else seed + i, stops))
            running += 1
        for event in decoder.step():
            if event.token is not None:
                results[event.uid].append(event.token)
            if event.finish is not None:
                running -= 1
    return results
