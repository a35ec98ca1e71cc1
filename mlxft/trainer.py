"""The training loop shared by every backend: data order, schedule, accumulation, validation,
best/last adapters, early stopping, metrics, checkpoints, exact resume and clean interruption.

A checkpoint (RUN/checkpoint/) holds the adapter, the backend's optimizer and RNG state, and
trainer.json: the step, the data cursor (epoch, batch index), the best validation loss and the
early-stopping counter. Data order is a pure function of (seed, epoch), so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlxft.atomic import atomic_dir, write_errors
from mlxft.backends.base import Backend
from mlxft.config import Config
from mlxft.data import Dataset, collate, length_grouped_batches, pack
from mlxft.errors import Interrupted, MlxftError
from mlxft.progress import TrainProgress
from mlxft.runs import MetricsWriter, Run
from mlxft.schedule import learning_rate, warmup_steps


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_val: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_samples / batch_size))


def total_steps(cfg: Config, n_train: int) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    epochs = t.epochs if t.epochs else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch(n_train, t.batch_size) / t.grad_accumulation))


class Trainer:
    def __init__(self, cfg: Config, run: Run, backend: Backend, train_set: Dataset, valid_set: Dataset):
        self.cfg, self.run, self.backend = cfg, run, backend
        self.train_set, self.valid_set = train_set, valid_set
        self.total = total_steps(cfg, len(train_set))
        self.warmup = warmup_steps(cfg.train.warmup, self.total)
        self.state = TrainState()
        self.pad_id = backend.tokenizer.pad_token_id
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self._stop_signal = 0

    # ------------------------------------------------------------------ data order

    def _batches_for(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            order = length_grouped_batches(self.train_set.samples, self.cfg.train.batch_size, self.cfg.seed, epoch)
            self._epoch_batches = (epoch, order)
        return self._epoch_batches[1]

    def _next_micro_batch(self):
        s = self.state
        batches = self._batches_for(s.epoch)
        if s.batch_index >= len(batches):
            s.epoch += 1
            s.batch_index = 0
            batches = self._batches_for(s.epoch)
        idx = batches[s.batch_index]
        s.batch_index += 1
        samples = [self.train_set.samples[i] for i in idx]
        if self.cfg.train.packing:
            return pack(samples, self.pad_id, self.cfg.train.max_seq_len)
        return collate(samples, self.pad_id)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        from mlxft.evaluate import score_dataset

        return score_dataset(self.backend, self.valid_set, self.cfg.train.batch_size, self.cfg.train.eval_batches)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        with write_errors("checkpoint", self.run.checkpoint), atomic_dir(self.run.checkpoint) as tmp:
            self.backend.save_adapter(tmp / "adapter")
            self.backend.save_state(tmp)
            extra = {"python_rng": repr(random.getstate()), "numpy_rng": _np_rng_state()}
            (tmp / "trainer.json").write_text(json.dumps({"state": asdict(self.state), **extra}, indent=2))

    def restore_checkpoint(self) -> None:
        ckpt = self.run.checkpoint
        try:
            data = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MlxftError(f"{ckpt}: no usable checkpoint to resume from ({exc})") from None
        self.state = TrainState(**data["state"])
        self.backend.load_state(ckpt)
        # Keep only the records up to the checkpoint, so the resumed curve continues it exactly.
        rows = [r for r in self.run.metrics() if r.get("step", 0) <= self.state.step]
        with open(self.run.metrics_file, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame):
        if self._stop_signal:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_signal = signum

    # ------------------------------------------------------------------ the loop

    def train(self, resume: bool = False) -> dict:
        cfg, t = self.cfg, self.cfg.train
        if resume:
            self.restore_checkpoint()
        metrics = MetricsWriter(self.run.metrics_file)
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        stopped_early = False
        last_val = self.state.best_val
        try:
            with TrainProgress(self.total, self.state.step) as progress:
                while self.state.step < self.total:
                    step = self.state.step + 1
                    lr = learning_rate(step, self.total, t.learning_rate, self.warmup, t.min_lr_ratio)
                    micro = [self._next_micro_batch() for _ in range(t.grad_accumulation)]
                    started = time.perf_counter()
                    result = self.backend.train_step(micro, lr)
                    elapsed = time.perf_counter() - started
                    tokens = sum(b.n_tokens for b in micro)
                    self.state.step = step
                    if not result.finite:
                        if not t.skip_nonfinite:
                            self.state.step -= 1
                            raise MlxftError(
                                f"step {step}: loss or gradients are not finite (loss={result.loss}, "
                                f"grad_norm={result.grad_norm}); the last good checkpoint is in {self.run.checkpoint}",
                                "lower train.learning_rate, lower lora.alpha relative to lora.rank, or set "
                                "train.skip_nonfinite: true")
                        self.state.skipped_steps += 1
                        metrics.write({"type": "skipped", "step": step, "reason": "non-finite"})
                        continue
                    self.state.tokens += tokens
                    self.state.seconds += elapsed
                    if step % t.log_every == 0 or step == self.total:
                        metrics.write({"type": "train", "step": step, "loss": result.loss, "lr": lr,
                                       "grad_norm": result.grad_norm, "tokens": tokens, "targets": result.n_targets,
                                       "tok_s": tokens / max(elapsed, 1e-9), "elapsed": round(self.state.seconds, 3)})
                    if step % t.eval_every == 0 or step == self.total:
                        val = self.evaluate()
                        last_val = val["loss"]
                        metrics.write({"type": "valid", "step": step, **val})
                        if self.state.best_val is None or val["loss"] < self.state.best_val:
                            self.state.best_val, self.state.best_step = val["loss"], step
                            self.state.evals_since_best = 0
                            with write_errors("best adapter", self.run.best_adapter):
                                self.backend.save_adapter(self.run.best_adapter)
                        else:
                            self.state.evals_since_best += 1
                            if t.early_stop_patience and self.state.evals_since_best >= t.early_stop_patience:
                                progress.message(f"early stop at step {step}: validation loss has not improved "
                                                 f"for {t.early_stop_patience} evaluations (best {self.state.best_val:.4f} "
                                                 f"at step {self.state.best_step})")
                                stopped_early = True
                    progress.step(step, result.loss, lr, self.state.tokens / max(self.state.seconds, 1e-9),
                                  last_val, self.backend.peak_memory())
                    if step % t.save_every == 0 or step == self.total or stopped_early:
                        self.save_checkpoint()
                    if self._stop_signal:
                        self.save_checkpoint()
                        raise Interrupted(step)
                    if stopped_early:
                        break
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            metrics.close()
        with write_errors("adapter", self.run.last_adapter):
            self.backend.save_adapter(self.run.last_adapter)
        return {"steps": self.state.step, "total_steps": self.total, "best_val_loss": self.state.best_val,
                "best_step": self.state.best_step, "last_val_loss": last_val, "tokens": self.state.tokens,
                "train_seconds": round(self.state.seconds, 2),
                "tok_s": self.state.tokens / max(self.state.seconds, 1e-9),
                "skipped_steps": self.state.skipped_steps, "early_stopped": stopped_early}


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]
