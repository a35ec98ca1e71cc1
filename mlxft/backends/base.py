"""The backend interface. The trainer, data pipeline, progress UI and run directory are shared;
a backend only loads the model with its adapter, runs steps, evaluates, saves and generates."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlxft.config import Config
from mlxft.data import Batch
from mlxft.distributed import World


@dataclass
class StepResult:
    loss: float          # mean loss per target token over the whole (accumulated) step
    n_targets: int       # target tokens scored
    grad_norm: float     # before clipping
    finite: bool         # False: the step was not applied (loss or gradients not finite)


@dataclass
class EvalResult:
    loss_sum: float
    n_targets: int
    n_correct: int


class Backend(abc.ABC):
    """One model plus (optionally) a LoRA/DoRA adapter, on one device."""

    name: str = "base"
    # Code shipped inside a model repo runs only when the user passes --trust-remote-code.
    trust_remote_code: bool = False
    # The chat format in use (mlxft.templates.ChatSetup): its end-of-turn ids stop generation too.
    chat_setup = None
    # The model folder loaded (its config.json and generation_config.json name EOS ids).
    model_path: Path | None = None

    def stop_ids(self, extra=()) -> set[int]:
        """Where generation stops: mlxft.templates.stop_ids, for this model and chat format."""
        from mlxft.templates import stop_ids

        return stop_ids(self.tokenizer, self.model_path, self.chat_setup, extra)

    def __init__(self, cfg: Config, world: World | None = None):
        self.cfg = cfg
        self.tokenizer = None
        # Data parallel: train_step sums gradients over the world's ranks before clipping.
        self.world = world or World()

    def load(self, model_path: Path, adapter: Path | None = None, train: bool = True) -> None:
        """Load the base model and tokenizer; attach a new adapter from cfg.lora when `train` and
        no `adapter` is given, else load `adapter` (trainable when `train`).

        The sequence every backend follows; each step is the backend's own: seed the framework's
        RNG, read the frozen base model and its tokenizer, put the adapter on it (or new LoRA
        layers to train), and for training make the optimizer and give each rank its own seed
        (its own dropout masks) before the model goes into training or eval mode."""
        from mlxft.backends.common import rank_seed

        self.seed(self.cfg.seed)
        self._load_base(Path(model_path))
        self._attach(adapter, train)
        if train:
            self._prepare_training()
            if self.world.rank:
                self.seed(rank_seed(self.cfg.seed, self.world.rank))
        self._finish_load(train)

    @abc.abstractmethod
    def seed(self, value: int) -> None:
        """Seed the framework's RNG (LoRA initialisation, dropout)."""

    @abc.abstractmethod
    def _load_base(self, model_path: Path) -> None:
        """Read the base model (frozen) and its tokenizer; set model_path, tokenizer and model."""

    @abc.abstractmethod
    def _attach(self, adapter: Path | None, train: bool) -> None:
        """Put `adapter` on the base (trainable when `train`), or new LoRA layers from cfg.lora
        when training without one; nothing for inference without one."""

    @abc.abstractmethod
    def _prepare_training(self) -> None:
        """Gradient checkpointing when asked, and the optimizer over the trainable weights."""

    @abc.abstractmethod
    def _finish_load(self, train: bool) -> None:
        """The model into training or eval mode, and the framework's own bookkeeping."""

    @abc.abstractmethod
    def train_step(self, batches: list[Batch], lr: float, n_total: int | None = None) -> StepResult:
        """Accumulate gradients over `batches` (one optimizer step) and apply them at `lr`.

        The loss is the sum over target tokens divided by `n_total`, the target count of the
        whole step (default: of `batches`). In a distributed world each rank passes its shard
        of the global batch with the global count; gradients and loss are summed over ranks, so
        every rank applies the same update as a single process given the whole batch. A rank
        whose shard is empty passes no batches and still takes part in the sum."""

    @abc.abstractmethod
    def trainable_finite(self) -> bool:
        """Whether every trainable weight is finite (checked before a checkpoint is written)."""

    @abc.abstractmethod
    def broadcast_trainable(self) -> None:
        """Copy rank 0's trainable weights to every rank (start of a distributed run)."""

    @abc.abstractmethod
    def eval_batch(self, batch: Batch) -> EvalResult:
        """Summed loss, target count and correct next-token predictions, no gradients."""

    @abc.abstractmethod
    def save_adapter(self, path: Path) -> None:
        """Write the adapter in the PEFT layout (adapter_config.json + adapter_model.safetensors)."""

    @abc.abstractmethod
    def save_state(self, path: Path) -> None:
        """Write optimizer and RNG state into folder `path` (for exact resume)."""

    @abc.abstractmethod
    def load_state(self, path: Path) -> None:
        """Restore what save_state wrote."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, on_token: Callable[[int], None] | None = None,
                 stop_ids: set[int] | None = None) -> list[int]:
        """Generate token ids after `prompt_ids`, calling on_token for each as it comes."""

    def logits(self, ids: list[int]):
        """Next-token logits (float32 NumPy, one row per position) for one sequence; export's
        self-check compares them with llama.cpp's."""
        raise NotImplementedError

    def target_top_k(self, batch: Batch, k: int):
        """(ids, logits), each (targets, k), float32 logits, largest first: the k most likely
        tokens at every position that predicts a target of `batch` (loss_mask[:, 1:], row by
        row), as replay distillation's teacher reads them. The default reads each row's logits;
        a backend that can run only the target positions through the LM head overrides this."""
        import numpy as np

        ids, vals = [], []
        for i in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[i].sum())
            where = np.flatnonzero(batch.loss_mask[i, 1:n]) if n > 1 else np.zeros(0, dtype=np.int64)
            if where.size == 0:
                continue
            logits = np.asarray(self.logits(batch.input_ids[i, :n].tolist()), dtype=np.float32)[where]
            kk = min(k, logits.shape[-1])
            top = np.argpartition(-logits, kk - 1, axis=-1)[:, :kk]
            order = np.argsort(-np.take_along_axis(logits, top, axis=-1), axis=-1, kind="stable")
            top = np.take_along_axis(top, order, axis=-1)
            ids.append(top)
            vals.append(np.take_along_axis(logits, top, axis=-1))
        if not ids:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return np.concatenate(ids).astype(np.int64), np.concatenate(vals)

    def generate_batch(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, stop_ids: set[int] | None = None) -> list[list[int]]:
        """Generated ids after each prompt (stop tokens not included): a row that stopped on its
        own has fewer than `max_tokens`. Backends that can run the prompts side by side override
        this; the default generates them one at a time."""
        return [self.generate(p, max_tokens, temperature, top_p, stop_ids=stop_ids) for p in prompts]

    def row_scores(self, batch: Batch) -> list[EvalResult]:
        """eval_batch's figures per row (teacher-forced scoring of many short answers at once);
        the default scores the rows one by one."""
        from mlxft.data import Sample, collate

        rows = []
        for i in range(batch.input_ids.shape[0]):
            real = batch.attention_mask[i] > 0
            ids, targets = batch.input_ids[i][real].tolist(), batch.loss_mask[i][real].astype(bool).tolist()
            rows.append(self.eval_batch(collate([Sample(ids=ids, targets=targets)], self.tokenizer.pad_token_id)))
        return rows

    def load_adapter_weights(self, adapter: Path) -> None:
        """Put the weights of a saved adapter (of the same shape) into the model being trained, so
        it computes with that adapter (the forgetting guard regenerates the chosen adapter's
        answers after training)."""
        raise NotImplementedError(f"the {self.name} backend cannot load adapter weights into a training model")

    def use_adapter(self, adapter: Path | None) -> None:
        """Switch an inference model (loaded with train=False) to `adapter`, or to the base alone
        for None, without reloading the base; adapters are read once and kept (for serving)."""
        raise NotImplementedError(f"the {self.name} backend cannot switch adapters")

    @abc.abstractmethod
    def sequence_logprobs(self, batch: Batch) -> list[float]:
        """Per-row summed log-probability of the target tokens (for retention probes)."""

    def device_name(self) -> str:
        return "cpu"

    def dtype_name(self) -> str:
        return "float32"

    def peak_memory(self) -> int | None:
        """Peak device memory in bytes where the device reports it (None on plain CPU)."""
        return None

    def model_flops(self) -> tuple[float | None, float | None]:
        """(model FLOPs per trained token, the device's measured FLOP/s) for the MFU figure in
        progress (mlxft.progress); None where a backend cannot tell."""
        return None, None

    def hidden_size(self) -> int | None:
        """The model's width (for the learning rate mlxft picks when the recipe leaves it open),
        from the loaded folder's config.json (its text_config for a multimodal config)."""
        import json

        try:
            config = json.loads((Path(self.model_path) / "config.json").read_text(encoding="utf-8"))
        except (TypeError, OSError, ValueError):
            return None
        config = config.get("text_config") or config
        value = config.get("hidden_size")
        return value if isinstance(value, int) else None

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        return 0, 0
