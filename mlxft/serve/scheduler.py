"""Continuous batching for `mlxft serve`: one generation thread runs a decode batch; requests join
it at token boundaries and leave it when they finish, stop, time out or lose their client.

Like llama.cpp's server slots and vLLM's scheduler: a bounded FIFO queue in front (full: the
caller answers 429 with Retry-After), at most `max_batch` rows decoding, a waiting request
admitted when a row frees and the memory its KV cache may grow to is available. Rows of one
batch share the weights, so runs with different adapters are batched per adapter (see _admit):
an empty batch gathers the waiting requests of the oldest request's adapter; a request for
another adapter stops admission until the batch drains, then its adapter is switched in.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from mlxft.decode.base import SeqRequest
from mlxft.serve.text import TextStream
from mlxft.sysinfo import available_memory


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str           # stop | length | cancelled | timeout | memory


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Ticket:
    """One request as the scheduler tracks it."""
    adapter: object                          # Path | None
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stop_ids: frozenset
    on_text: Callable[[str], None] | None    # called on the generation thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    deadline: float = float("inf")
    uid: int = 0
    started: float = 0.0
    stream: TextStream | None = None
    generated: int = 0


class Scheduler:
    def __init__(self, backend, max_batch: int, max_queue: int, timeout: float,
                 prompt_cache_bytes: int = 0, memory_reserve: int = 512 << 20, adapter=None):
        self.backend, self.tokenizer = backend, backend.tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.memory_reserve = memory_reserve
        self.decoder = backend.decoder(max_batch=max_batch, prompt_cache_bytes=prompt_cache_bytes)
        self.kv_bytes_per_token = self.decoder.kv_bytes_per_token()
        self.adapter = adapter              # the adapter the backend's model has on now
        self._uids = itertools.count()
        self._queue: deque[Ticket] = deque()
        self._active: dict[int, Ticket] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._seconds_per_request = 1.0      # running mean, for Retry-After
        self.stats = {"requests": 0, "cancelled": 0, "timeouts": 0, "tokens": 0, "rejected": 0, "peak_batch": 0}

    # ------------------------------------------------------------------ any thread

    def submit(self, ticket: Ticket) -> concurrent.futures.Future:
        with self._wake:
            free_rows = max(0, self.max_batch - len(self._active))
            if len(self._queue) >= self.max_queue + free_rows:
                self.stats["rejected"] += 1
                waves = (len(self._queue) + len(self._active)) / max(1, self.max_batch)
                raise QueueFull(max(1, round(waves * self._seconds_per_request)))
            ticket.uid = next(self._uids)
            ticket.deadline = time.monotonic() + self.timeout
            ticket.stream = TextStream(self.tokenizer, ticket.stops)
            ticket.started = time.monotonic()
            self._queue.append(ticket)
            self.stats["requests"] += 1
            self._wake.notify()
        return ticket.future

    def wake(self) -> None:
        """Look at the queue now (a waiting client went away)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # ------------------------------------------------------------------ the generation thread

    def run(self) -> None:
        """The loop; runs on the generation thread until close()."""
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self._active:
                    self._wake.wait()
                if self._closed:
                    break
                self._drop_waiting()
            try:
                self._drop_running()
                self._admit()
                if not len(self.decoder):
                    # nothing admitted (memory short, or all left): wait for a row or a request
                    with self._wake:
                        if not self._closed and not self._active:
                            self._wake.wait(0.05)
                    continue
                self._step()
            except Exception as exc:  # the model failed: fail the running requests, keep serving
                self._fail_running(exc)
        self.decoder.remove(list(self._active))
        for ticket in [*self._active.values(), *self._queue]:
            self._finish(ticket, "cancelled")
        self.decoder.close()

    def _fail_running(self, exc: Exception) -> None:
        self.decoder.remove(list(self._active))
        for ticket in self._active.values():
            if not ticket.future.done():
                ticket.future.set_exception(exc)
        self._active.clear()

    def _drop_waiting(self) -> None:
        now, kept = time.monotonic(), deque()
        for ticket in self._queue:
            if ticket.cancelled.is_set():
                self._finish(ticket, "cancelled")
            elif now > ticket.deadline:
                self._finish(ticket, "timeout")
            else:
                kept.append(ticket)
        self._queue = kept

    def _drop_running(self) -> None:
        now = time.monotonic()
        gone = [t for t in self._active.values() if t.cancelled.is_set() or now > t.deadline]
        if gone:
            self.decoder.remove([t.uid for t in gone])
            for ticket in gone:
                del self._active[ticket.uid]
                self._finish(ticket, "cancelled" if ticket.cancelled.is_set() else "timeout")

    def _fits(self, ticket: Ticket) -> bool:
        """Whether the memory this row's KV cache can grow to is free (beside a reserve)."""
        free = available_memory()
        if free is None:
            return True
        need = self.kv_bytes_per_token * (len(ticket.prompt) + ticket.max_tokens)
        return free - need >= self.memory_reserve

    def _admit(self) -> None:
        """Fill free rows from the queue. An empty batch takes the adapter of the oldest waiting
        request and gathers every waiting request of that adapter, in order; while rows run, a
        request joins only if no request for another adapter waits before it, so the batch then
        drains and the oldest waiting request is served next (no adapter starves)."""
        regroup = not self._active
        if regroup:
            with self._wake:
                head = self._queue[0] if self._queue else None
            if head is not None and head.adapter != self.adapter:
                self._switch(head.adapter)
        while len(self._active) < self.max_batch:
            ticket = self._pick(regroup)
            if ticket is None:
                return
            fits = self._fits(ticket)
            if not fits and self._active:
                return  # wait until running rows finish and free their caches
            with self._wake:
                self._queue.remove(ticket)  # only this thread removes from the queue
            if not fits:
                self._finish(ticket, "memory")
                continue
            self._active[ticket.uid] = ticket
            self.decoder.insert(SeqRequest(ticket.uid, ticket.prompt, ticket.max_tokens, ticket.temperature,
                                           ticket.top_p, ticket.seed, ticket.stop_ids))
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._active))

    def _pick(self, regroup: bool) -> Ticket | None:
        """The oldest waiting request for the adapter in use; past requests for other adapters
        only when regrouping an empty batch."""
        with self._wake:
            for ticket in self._queue:
                if ticket.adapter == self.adapter:
                    return ticket
                if not regroup:
                    return None
        return None

    def _switch(self, adapter) -> None:
        self.backend.use_adapter(adapter)
        self.adapter = adapter
        self.decoder.retarget(self.backend.model, str(adapter))

    def _step(self) -> None:
        ended = []
        for event in self.decoder.step():
            ticket = self._active.get(event.uid)
            if ticket is None:
                continue
            if event.token is not None:
                ticket.generated += 1
                self.stats["tokens"] += 1
                self._send(ticket, ticket.stream.push(event.token))
                if ticket.stream.stopped:
                    ended.append(ticket)
                    self._finish(ticket, "stop")
                    continue
            if event.finish is not None:
                del self._active[event.uid]
                self._finish(ticket, event.finish)
        if ended:
            self.decoder.remove([t.uid for t in ended])
            for ticket in ended:
                self._active.pop(ticket.uid, None)

    def _send(self, ticket: Ticket, piece: str) -> None:
        if piece and ticket.on_text is not None:
            try:
                ticket.on_text(piece)
            except Exception:  # the client side is gone; its cancel flag ends the row
                ticket.cancelled.set()

    def _finish(self, ticket: Ticket, reason: str) -> None:
        if ticket.future.done():
            return
        stream = ticket.stream
        if reason in ("stop", "length"):
            self._send(ticket, stream.finish())
            text = stream.text
            elapsed = time.monotonic() - ticket.started
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * elapsed
        else:
            text = stream.text[:stream.sent]
            if reason == "cancelled":
                self.stats["cancelled"] += 1
            elif reason == "timeout":
                self.stats["timeouts"] += 1
        ticket.future.set_result(Generation(text, len(ticket.prompt), ticket.generated, reason))
