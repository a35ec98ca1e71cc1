"""The training loop shared by every backend: data order, schedule, accumulation, validation,
best/last adapters, early stopping, metrics, checkpoints, exact resume and clean interruption.

A checkpoint (RUN/checkpoint/) holds the adapter, the backend's optimizer and RNG state, and
trainer.json: the step, the data cursor (epoch, batch index), the best validation loss, the
chosen adapter's figures and the early-stopping counter.

Which adapter is kept (RUN/adapter-best, what generate, fuse and export use): at every
validation the current adapter is scored on validation loss and, when a retention tracker is
given and its value can change the decision, on retention (teacher-forced scores of the base
model's own probe answers, no generation). Adapters that meet the guard (retention at least
retention.floor, at most retention.max_changed changed probes) rank above those that do not;
among them the lowest validation loss wins, otherwise the highest retention (the rules are in
mlxft/guard_policy.py). Training stops after train.early_stop_patience validations without
improvement (see min_improvement), or as soon as the guard is missed at a validation that did
not improve.

Data order is a pure function of (seed, epoch), so a resumed run sees
exactly the batches the uninterrupted run would have seen.

Distributed (data parallel): every rank holds the whole tokenized dataset and walks the same
global batch order; each micro-batch of train.batch_size samples is dealt round-robin to the
ranks, the loss is normalised by the global target count and the backend sums gradients over
ranks, so train.batch_size, the step count and the learning-rate schedule mean what they mean
in a single process. Rank 0 alone writes the run directory; a checkpoint also holds every other
rank's optimizer and RNG state (checkpoint/ranks/N/), gathered to rank 0 before anything is
written, so a rank that dies mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import ast
import json
import math
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlxft.atomic import atomic_dir, write_errors
from mlxft.backends.base import Backend
from mlxft.config import Config
from mlxft.data import Batch, Dataset, collate, length_grouped_batches, pack
from mlxft.distributed import PeerLost, bytes_to_dir, dir_to_bytes, resume_command
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
    chosen_step: int | None = None      # the adapter in RUN/adapter-best
    chosen_val: float | None = None
    chosen_accuracy: float | None = None
    chosen_retention: dict | None = None
    initial_val: dict | None = None     # validation figures of the untrained adapter (step 0)
    stop_reason: str | None = None


def min_improvement(best: float) -> float:
    """How much validation loss must fall to count as still improving for early stopping: 1% of
    it, and at least 1e-3 nats/token (a set learned to ~0.001 otherwise creeps down by 1e-5 per
    validation for hundreds of steps while retention sinks)."""
    return max(1e-3, 0.01 * best)


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_samples / batch_size))


def total_steps(cfg: Config, n_train: int) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    epochs = t.epochs if t.epochs else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch(n_train, t.batch_size) / t.grad_accumulation))


class Trainer:
    def __init__(self, cfg: Config, run: Run, backend: Backend, train_set: Dataset, valid_set: Dataset,
                 resume_from: Path | None = None, retention=None, on_step=None):
        """`retention`: a callable scoring the current adapter's retention (a dict with "score"),
        or None. `on_step(step, result, batches, seconds)`: called after every applied optimizer
        step with its StepResult, this rank's micro-batches and the seconds train_step took
        (benchmarks time steps through it)."""
        self.cfg, self.run, self.backend = cfg, run, backend
        self.world = backend.world
        self.writes = self.world.is_root  # only rank 0 touches the run directory
        self.train_set, self.valid_set = train_set, valid_set
        self.resume_from = Path(resume_from) if resume_from else run.checkpoint
        self.saved_step: int | None = None
        self._last_val: float | None = None
        from mlxft.defaults import resolve

        resolve(cfg, len(train_set), backend.hidden_size())  # a no-op when the caller resolved them
        self.retention, self.on_step = retention, on_step
        self.total = total_steps(cfg, len(train_set))
        self.warmup = warmup_steps(cfg.train.warmup, self.total)
        self.state = TrainState()
        self.pad_id = backend.tokenizer.pad_token_id
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self._stop_signal = 0
        # Where the loop's time goes besides the steps (seconds this process spent).
        self.timings = {"validation_s": 0.0, "retention_s": 0.0, "checkpoint_s": 0.0}
        self.retention_scored = 0  # validations at which retention was scored (mlxft.guard_policy)

    # ------------------------------------------------------------------ data order

    def _batches_for(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            order = length_grouped_batches(self.train_set.samples, self.cfg.train.batch_size, self.cfg.seed, epoch)
            self._epoch_batches = (epoch, order)
        return self._epoch_batches[1]

    def _next_micro_indices(self) -> list[int]:
        s = self.state
        batches = self._batches_for(s.epoch)
        if s.batch_index >= len(batches):
            s.epoch += 1
            s.batch_index = 0
            batches = self._batches_for(s.epoch)
        idx = batches[s.batch_index]
        s.batch_index += 1
        return idx

    def _next_step_batches(self) -> tuple[list[Batch], int, int]:
        """This rank's micro-batches for the next optimizer step, with the target and token
        counts of the whole (global) step."""
        rank, size = self.world.rank, self.world.size
        local, n_targets, n_tokens = [], 0, 0
        for _ in range(self.cfg.train.grad_accumulation):
            samples = [self.train_set.samples[i] for i in self._next_micro_indices()]
            n_targets += sum(s.n_targets for s in samples)
            n_tokens += sum(len(s) for s in samples)
            shard = samples[rank::size]
            if not shard:
                continue
            if self.cfg.train.packing:
                local.append(pack(shard, self.pad_id, self.cfg.train.max_seq_len))
            else:
                local.append(collate(shard, self.pad_id))
        return local, n_targets, n_tokens

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        from mlxft.evaluate import score_dataset

        return score_dataset(self.backend, self.valid_set, self.cfg.train.batch_size, self.cfg.train.eval_batches,
                             world=self.world)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        started = time.perf_counter()
        try:
            self._save_checkpoint()
        finally:
            self.timings["checkpoint_s"] += time.perf_counter() - started

    def _save_checkpoint(self) -> None:
        if not self.backend.trainable_finite():
            last = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
            raise MlxftError(f"step {self.state.step}: the adapter weights are not finite, so the checkpoint was "
                             f"not overwritten (last good: {last}, in {self.run.checkpoint})",
                             "lower train.learning_rate or lora.alpha, or set train.skip_nonfinite: true")
        rank_states = None
        if self.world.distributed:
            # Gather first: if a rank is gone this raises before a byte is written.
            with tempfile.TemporaryDirectory(prefix="mlxft-state-") as d:
                self.backend.save_state(Path(d))
                rank_states = self.world.all_gather_bytes(dir_to_bytes(Path(d)))
        if not self.writes:
            return
        with write_errors("checkpoint", self.run.checkpoint), atomic_dir(self.run.checkpoint) as tmp:
            self.backend.save_adapter(tmp / "adapter")
            if rank_states is None:
                self.backend.save_state(tmp)
            else:
                bytes_to_dir(rank_states[0], tmp)
                for r, blob in enumerate(rank_states[1:], start=1):
                    bytes_to_dir(blob, tmp / "ranks" / str(r))
            extra = {"python_rng": repr(random.getstate()), "numpy_rng": _np_rng_state(),
                     "world_size": self.world.size}
            (tmp / "trainer.json").write_text(json.dumps({"state": asdict(self.state), **extra}, indent=2))
        self.saved_step = self.state.step

    def restore_checkpoint(self) -> None:
        ckpt = self.resume_from
        try:
            data = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MlxftError(f"{ckpt}: no usable checkpoint to resume from ({exc})") from None
        self.state = TrainState(**data["state"])
        _restore_rng(data)
        own = ckpt / "ranks" / str(self.world.rank)
        # A rank the checkpoint has no state for (the world grew) starts from rank 0's optimizer
        # state, which every rank shares; only its dropout stream differs from an unbroken run.
        self.backend.load_state(own if self.world.rank and own.is_dir() else ckpt)
        self.saved_step = self.state.step
        if self.writes:
            # Keep only the records up to the checkpoint, so the resumed curve continues it exactly.
            rows = [r for r in self.run.metrics() if r.get("step", 0) <= self.state.step]
            with open(self.run.metrics_file, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame):
        # A second Ctrl-C forces the way out; a launcher's SIGTERM after the terminal's SIGINT
        # (torchrun forwards one) must not cut the checkpoint the first signal asked for.
        if self._stop_signal == signum:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_signal = signum

    # ------------------------------------------------------------------ the loop

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop: all ranks agree, so they checkpoint together."""
        if not self.world.distributed:
            return bool(self._stop_signal)
        return self.world.all_sum([1.0 if self._stop_signal else 0.0])[0] > 0

    def _peer_lost(self, exc: PeerLost, step: int) -> PeerLost:
        if self.saved_step is None:
            where = "no checkpoint had been written yet"
        else:
            where = f"the last checkpoint (step {self.saved_step}) in {self.run.checkpoint} is intact"
        return PeerLost(f"{self.world.label()}: lost contact with another rank during step {step} "
                        f"({exc.detail}); {where}",
                        f"resume with: {resume_command(self.world, self.run.path)}")

    def train(self, resume: bool = False) -> dict:
        t = self.cfg.train
        if resume:
            self.restore_checkpoint()
        self.backend.broadcast_trainable()
        metrics = MetricsWriter(self.run.metrics_file) if self.writes else None
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        stopped_early = False
        self._last_val = self.state.best_val
        if self.state.step == 0 and self.state.initial_val is None and self.valid_set.samples:
            self.state.initial_val = self.evaluate()
            if metrics:
                metrics.write({"type": "valid", "step": 0, **self.state.initial_val})
        try:
            # Rank 0 alone shows progress, so only it measures the device for the MFU figure.
            per_token, device_flops = self.backend.model_flops() if self.writes else (None, None)
            with TrainProgress(self.total, self.state.step, flops_per_token=per_token, device_flops=device_flops,
                               enabled=self.writes) as progress:
                while self.state.step < self.total:
                    step = self.state.step + 1
                    try:
                        outcome = self._one_step(step, metrics, progress)
                        if outcome is None:  # a non-finite step skipped under train.skip_nonfinite
                            continue
                        stopped_early = outcome
                        if step % t.save_every == 0 or step == self.total or stopped_early:
                            self.save_checkpoint()
                        if self._stop_requested():
                            if self.saved_step != step:
                                self.save_checkpoint()
                            raise Interrupted(step)
                    except PeerLost as exc:
                        raise self._peer_lost(exc, step) from None
                    if stopped_early:
                        break
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            if metrics is not None:
                metrics.close()
        if self.writes:
            with write_errors("adapter", self.run.last_adapter):
                self.backend.save_adapter(self.run.last_adapter)
        s = self.state
        return {"steps": s.step, "total_steps": self.total, "best_val_loss": s.best_val,
                "best_step": s.best_step, "last_val_loss": self._last_val, "tokens": s.tokens,
                "chosen_step": s.chosen_step, "chosen_val_loss": s.chosen_val, "chosen_retention": s.chosen_retention,
                "chosen_accuracy": s.chosen_accuracy,
                "initial_val": s.initial_val, "stop_reason": s.stop_reason,
                "train_seconds": round(self.state.seconds, 2),
                "tok_s": self.state.tokens / max(self.state.seconds, 1e-9),
                "skipped_steps": self.state.skipped_steps, "early_stopped": stopped_early,
                "world_size": self.world.size, "retention_scored": self.retention_scored,
                "timings": {k: round(v, 2) for k, v in self.timings.items()}}

    def _one_step(self, step: int, metrics, progress) -> bool | None:
        """Run optimizer step `step`; None when the step was skipped (non-finite), else whether
        early stopping fired."""
        t = self.cfg.train
        lr = learning_rate(step, self.total, t.learning_rate, self.warmup, t.min_lr_ratio)
        if not math.isfinite(lr):
            raise MlxftError(f"step {step}: the learning rate is not finite ({lr}); nothing was applied",
                             "check train.learning_rate, train.warmup and train.min_lr_ratio")
        micro, n_targets, tokens = self._next_step_batches()
        started = time.perf_counter()
        result = self.backend.train_step(micro, lr, n_total=n_targets)
        elapsed = time.perf_counter() - started
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
            if metrics:
                metrics.write({"type": "skipped", "step": step, "reason": "non-finite"})
            return None
        self.state.tokens += tokens
        self.state.seconds += elapsed
        if metrics and (step % t.log_every == 0 or step == self.total):
            metrics.write({"type": "train", "step": step, "loss": result.loss, "lr": lr,
                           "grad_norm": result.grad_norm, "tokens": tokens, "targets": n_targets,
                           "tok_s": tokens / max(elapsed, 1e-9), "elapsed": round(self.state.seconds, 3)})
        if self.on_step is not None:
            self.on_step(step, result, micro, elapsed)
        stopped_early = False
        if step % t.eval_every == 0 or step == self.total:
            stopped_early = self._validate(step, metrics, progress)
        progress.step(step, result.loss, lr, self.state.tokens / max(self.state.seconds, 1e-9),
                      self._last_val, self.backend.peak_memory())
        return stopped_early


    def _score_retention(self) -> dict | None:
        """Rank 0 scores retention (it holds the baseline); every rank gets the same score, so
        all make the same stopping decision."""
        if self.retention is None and not self.world.distributed:
            return None
        result = self.retention() if (self.retention is not None and self.world.is_root) else None
        if not self.world.distributed:
            return result
        mine = result or {}
        have, score, changed, counted = self.world.all_sum([1.0 if result else 0.0, mine.get("score") or 0.0,
                                                            float(mine.get("changed") or 0),
                                                            1.0 if mine.get("changed") is not None else 0.0])
        if not have:
            return None
        # every rank decides from the same figures (mlxft.guard_policy reads the changed count too)
        return result if result is not None else {"score": score, "changed": round(changed) if counted else None}

    def _validate(self, step: int, metrics, progress) -> bool:
        """Validation (and retention) at `step`: keep the adapter if it ranks best, and say
        whether training should stop."""
        from mlxft.guard_policy import meets_guard, ranks_above, retention_can_decide

        t, s, guard = self.cfg.train, self.state, self.cfg.retention
        floor, max_changed = guard.floor, guard.max_changed
        started = time.perf_counter()
        val = self.evaluate()
        self.timings["validation_s"] += time.perf_counter() - started
        improved = s.best_val is None or val["loss"] < s.best_val - min_improvement(s.best_val)
        patience_ran_out = bool(t.early_stop_patience) and not improved and \
            s.evals_since_best + 1 >= t.early_stop_patience
        ret = None
        if guard.score_at == "every" or retention_can_decide(val["loss"], improved, patience_ran_out, s.chosen_val,
                                                             s.chosen_retention, floor, max_changed):
            started = time.perf_counter()
            ret = self._score_retention()
            self.timings["retention_s"] += time.perf_counter() - started
            self.retention_scored += ret is not None
        score = ret.get("score") if ret else None
        self._last_val = val["loss"]
        if metrics:
            extra = {"retention": score} if score is not None else {}
            if ret and ret.get("changed") is not None:
                extra["changed"] = ret["changed"]
            metrics.write({"type": "valid", "step": step, **val, **extra})
        if improved:
            s.best_val, s.best_step = val["loss"], step
            s.evals_since_best = 0
        else:
            s.evals_since_best += 1
        if ranks_above(val["loss"], ret, s.chosen_val, s.chosen_retention, floor, max_changed):
            s.chosen_step, s.chosen_val, s.chosen_retention = step, val["loss"], ret
            s.chosen_accuracy = val.get("accuracy")
            if self.writes:
                with write_errors("best adapter", self.run.best_adapter):
                    self.backend.save_adapter(self.run.best_adapter)
        if step >= self.total:
            return False
        misses_guard = score is not None and not meets_guard(ret, floor, max_changed)
        if t.early_stop_patience and s.evals_since_best >= t.early_stop_patience:
            s.stop_reason = (f"validation loss has not improved for {t.early_stop_patience} evaluations "
                             f"(best {s.best_val:.4f} at step {s.best_step})")
        elif misses_guard and not improved:
            what = (f"retention {score:.3f} fell below retention.floor={floor:g}" if score < floor else
                    f"{ret.get('changed')} probe answers changed (retention.max_changed={max_changed})")
            s.stop_reason = f"{what} and validation loss stopped improving"
        if s.stop_reason:
            progress.message(f"early stop at step {step}: {s.stop_reason}")
        return s.stop_reason is not None


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _restore_rng(saved: dict) -> None:
    """Put back the Python and NumPy RNG states save_checkpoint wrote (absent in older checkpoints)."""
    if "python_rng" in saved:
        random.setstate(ast.literal_eval(saved["python_rng"]))
    if "numpy_rng" in saved:
        name, keys, pos, has_gauss, cached = saved["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
