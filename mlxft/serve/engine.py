"""The model side of `mlxft serve`: one base model loaded once, the adapters of several runs of
that base, and a continuous-batching scheduler (mlxft.serve.scheduler) on one generation thread
that runs every request: its own sampling settings, stop strings, seed, timeout and cancellation
when the client goes away."""

from __future__ import annotations

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


def _model_id(spec: str | None, resolved) -> str:
    if spec is None or resolved.source == "default":
        return "default"
    if resolved.source in ("run", "mlx-lm", "local", "gguf"):
        return Path(spec).expanduser().resolve().name
    return spec


class Engine:
    def __init__(self, specs: list[str | None], backend: str = "auto", adapter: str = "best",
                 trust_remote_code: bool = False, max_batch: int | None = None, max_queue: int = 64,
                 timeout: float = 600.0, prompt_cache_mb: int = 512, weights: str = "float32"):
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
        # One adapter served: it is loaded with the model, as `mlxft generate` loads a run (on f32
        # PyTorch folded into the weights, so no LoRA side path runs at each token); several are
        # switched per batch (mlxft.serve.scheduler).
        adapters = {m.adapter for m in self.models.values()}
        self.preloaded = adapters.pop() if len(adapters) == 1 else None
        if self.preloaded is None and any(m.adapter for m in self.models.values()):
            weights = "float32"  # adapters switched per batch: PEFT layers over float32 weights
        self.backend = self._worker.submit(load_backend, base.path, self.preloaded, backend, trust_remote_code,
                                           0, weights).result()
        self.tokenizer = self.backend.tokenizer
        self.base_template = getattr(self.tokenizer, "chat_template", None)
        self.context = model_context(base.path) or 2048
        self.backend_stop_ids = self.backend.stop_ids()
        self.scheduler = self._worker.submit(self._scheduler, max_batch, max_queue, timeout,
                                             prompt_cache_mb << 20).result()
        self.max_batch = self.scheduler.max_batch
        self.stats = self.scheduler.stats
        self._loop = self._worker.submit(self.scheduler.run)

    def _scheduler(self, max_batch, max_queue, timeout, prompt_cache_bytes):
        from mlxft.serve.scheduler import Scheduler

        scheduler = Scheduler(self.backend, max_batch or 1, max_queue, timeout, prompt_cache_bytes,
                              adapter=self.preloaded)
        if not max_batch:
            scheduler.max_batch = default_max_batch(scheduler.kv_bytes_per_token, self.context)
        return scheduler

    def find(self, name: str) -> ServedModel | None:
        return self.models.get(name) or self.models.get(self.aliases.get(name, ""))

    def use_template(self, model: ServedModel) -> None:
        """Make the shared tokenizer render chats as `model`'s run trained (its recorded chat
        template, else the base's); called right before formatting, on the event-loop thread."""
        self.tokenizer.chat_template = model.setup.template if model.setup is not None else self.base_template

    def submit(self, model: ServedModel, prompt_ids: list[int], max_tokens: int, temperature: float,
               top_p: float, seed: int | None, stop: list[str], on_text: Callable[[str], None] | None = None):
        """Queue a generation; returns (future of a Generation, the Event that cancels it).
        `on_text` gets each piece of text as it becomes final, on the generation thread. Raises
        QueueFull when the queue is at its bound."""
        from mlxft.serve.scheduler import Ticket

        stop_ids = set(self.backend_stop_ids) | set(model.setup.stop_ids if model.setup is not None else ())
        ticket = Ticket(model.adapter, list(prompt_ids), max_tokens, temperature, top_p, seed, list(stop),
                        frozenset(stop_ids), on_text)
        return self.scheduler.submit(ticket), ticket.cancelled

    def close(self) -> None:
        self.scheduler.close()
        self._worker.shutdown(wait=False, cancel_futures=True)


def default_max_batch(kv_bytes_per_token: int, context: int, cap: int = 16) -> int:
    """Rows that fit in half the memory free now, each sized for a full context (at most 4096
    tokens), between 1 and `cap`. The cap of 16 is the batch the load check measured
    (docs/serve.md); more rows raise the aggregate rate (generate_batch runs 32) while each
    client's own rate falls, so going past it is the user's call (--max-batch)."""
    from mlxft.sysinfo import available_memory

    free = available_memory()
    if free is None:
        return 8
    per_row = kv_bytes_per_token * min(context, 4096)
    return max(1, min(cap, int(free // 2 // max(1, per_row))))
