"""The model side of `mlxft serve`: one base model loaded once, the adapters of several runs
of that base switched per request, and generation one request at a time on a single worker
thread (FIFO), with stop strings, a seed, and cancellation when the client goes away."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlxft.errors import ModelError


@dataclass
class ServedModel:
    id: str                      # what a request's `model` names
    spec: str                    # what the user passed on the command line
    adapter: Path | None         # None: the base model alone
    system: str | None = None    # the run's system prompt, used when a request sends none
    setup: object | None = None  # the chat template and stop ids the run trained with (templates.ChatSetup)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str           # stop | length | cancelled


class Cancelled(Exception):
    """Raised inside the token callback to end a generation early."""


def _model_id(spec: str | None, resolved) -> str:
    if spec is None or resolved.source == "default":
        return "default"
    if resolved.source in ("run", "mlx-lm", "local", "gguf"):
        return Path(spec).expanduser().resolve().name
    return spec


class Engine:
    def __init__(self, specs: list[str | None], backend: str = "auto", adapter: str = "best",
                 trust_remote_code: bool = False):
        from mlxft.inference import load_backend, model_context, run_system_prompt
        from mlxft.sources import resolve_model
        from mlxft.templates import recorded

        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str] = {}
        base = None
        for spec in specs or [None]:
            resolved = resolve_model(spec, adapter=adapter)
            if base is None:
                base = resolved
            elif resolved.path.resolve() != base.path.resolve():
                raise ModelError(f"{spec}: its base model {resolved.path} differs from {base.path} "
                                 f"(of {base.spec}); one server serves runs of one base")
            model = ServedModel(id=_model_id(spec, resolved), spec=str(spec or "default"),
                                adapter=resolved.adapter, system=run_system_prompt(resolved),
                                setup=recorded(resolved.run))
            if model.id in self.models:
                raise ModelError(f"{spec}: two models would both be called '{model.id}'")
            self.models[model.id] = model
            if spec and spec != model.id:
                self.aliases.setdefault(spec, model.id)
        self.base = base
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxft-generate")
        # Loaded on the generation thread, so all of the model's work happens on one thread
        # (MLX keeps its streams per thread).
        self.backend = self._worker.submit(load_backend, base.path, None, backend, trust_remote_code).result()
        self.tokenizer = self.backend.tokenizer
        self.base_template = getattr(self.tokenizer, "chat_template", None)
        self.context = model_context(base.path) or 2048
        self.active: Path | None = None
        self.stats = {"requests": 0, "cancelled": 0, "tokens": 0}

    def find(self, name: str) -> ServedModel | None:
        return self.models.get(name) or self.models.get(self.aliases.get(name, ""))

    def use_template(self, model: ServedModel) -> None:
        """Make the shared tokenizer render chats as `model`'s run trained (its recorded chat
        template, else the base's); called right before formatting, on the event-loop thread."""
        self.tokenizer.chat_template = model.setup.template if model.setup is not None else self.base_template

    def submit(self, fn: Callable, *args):
        """Run `fn(*args)` on the generation thread; returns a concurrent Future."""
        return self._worker.submit(fn, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def generate(self, model: ServedModel, prompt_ids: list[int], max_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: list[str], on_text: Callable[[str], None] | None,
                 cancelled: threading.Event) -> Generation:
        """Generate on the calling thread (use submit() to queue it); `on_text` gets each piece
        of text as it becomes final (held back while it could still be the start of a stop
        string); stops at EOS, a stop string, max_tokens, or when `cancelled` is set."""
        from mlxft.inference import TokenPrinter

        self.stats["requests"] += 1
        if cancelled.is_set():
            self.stats["cancelled"] += 1
            return Generation("", len(prompt_ids), 0, "cancelled")
        if model.adapter != self.active:
            self.backend.use_adapter(model.adapter)
            self.active = model.adapter
        if seed is not None:
            seed_everything(seed)
        stops = [s for s in stop if s]
        state = {"sent": 0, "finish": None, "text": "", "all": ""}

        def on_piece(piece):
            state["all"] += piece
            text = state["all"]
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                state["text"] = text[:cut]
                _send(text[:cut])
                state["finish"] = "stop"
                raise Cancelled
            _send(text[:len(text) - _held_back(text, stops)])

        def _send(final: str):
            if len(final) > state["sent"] and on_text is not None:
                on_text(final[state["sent"]:])
            state["sent"] = max(state["sent"], len(final))

        class Printer(TokenPrinter):
            def __call__(self, token):
                if cancelled.is_set():
                    state["finish"] = "cancelled"
                    raise Cancelled
                super().__call__(token)

        printer = Printer(self.tokenizer, on_piece)
        try:
            stop_ids = list(model.setup.stop_ids) if model.setup is not None else []
            self.backend.generate(prompt_ids, max_tokens, temperature=temperature, top_p=top_p, on_token=printer,
                                  stop_ids=stop_ids)
        except Cancelled:
            pass
        n = len(printer.ids)
        self.stats["tokens"] += n
        if state["finish"] == "cancelled":
            self.stats["cancelled"] += 1
            return Generation(printer.text()[:state["sent"]], len(prompt_ids), n, "cancelled")
        if state["finish"] == "stop":
            return Generation(state["text"], len(prompt_ids), n, "stop")
        text = printer.text()
        _send(text)
        return Generation(text, len(prompt_ids), n, "length" if n >= max_tokens else "stop")


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with (not yet final)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def seed_everything(seed: int) -> None:
    """Seed every generator sampling may draw from (Python, NumPy, torch, MLX)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].random.seed(seed % 2**32)
