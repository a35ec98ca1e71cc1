"""The training loop shared by every backend: schedule, accumulation, validation, metrics and
clean interruption. Its parts live beside it: the batch order and the dealing of batches to
ranks in mlxft/data.py (BatchOrder, shard), the checkpoint and RNG state in mlxft/checkpoint.py,
which adapter is kept and when to stop in mlxft/selection.py (the forgetting guard's rules in
mlxft/guard_policy.py). The config must already be
resolved (mlxft.defaults.resolve, which the pipeline calls): the trainer rewrites nothing.

Distributed (data parallel): every rank holds the whole tokenized dataset and walks the same
global batch order; each micro-batch of train.batch_size samples is dealt round-robin to the
ranks, the loss is normalised by the global target count and the backend sums gradients over
ranks, so train.batch_size, the step count and the learning-rate schedule mean what they mean
in a single process. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxft import checkpoint
from mlxft.atomic import atomic_dir, write_errors
from mlxft.backends.base import Backend
from mlxft.config import Config
from mlxft.data import Batch, BatchOrder, Dataset, shard
from mlxft.distributed import PeerLost, let_one_terminate_pass, resume_command
from mlxft.errors import ConfigError, Interrupted, MlxftError
from mlxft.progress import TrainProgress
from mlxft.runs import MetricsWriter, Run
from mlxft.schedule import learning_rate, warmup_steps
from mlxft.selection import Selection


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
    candidates: list = field(default_factory=list)  # retention.score_at lazy (mlxft/candidates.py)


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
        unresolved = [k for k in ("learning_rate", "eval_every") if getattr(cfg.train, k) is None]
        if unresolved:
            raise ConfigError(f"train.{unresolved[0]}: not set", "resolve the config first (mlxft.defaults.resolve)")
        self.retention, self.on_step = retention, on_step
        # Every rank must call _score_retention at the same validations; in a distributed world
        # only rank 0 holds the tracker, so the config alone says whether retention is tracked.
        tracked = cfg.retention.enabled and (retention is not None or self.world.distributed)
        self.selection = Selection(cfg.train.early_stop_patience, cfg.retention.floor, cfg.retention.max_changed,
                                   cfg.retention.score_at if tracked else "every", cfg.retention.floor_margin)
        self._stale_candidates: list[int] = []  # dropped candidates, deleted once a checkpoint no longer lists them
        self.order = BatchOrder(train_set.samples, cfg.train.batch_size, cfg.seed)
        self.total = total_steps(cfg, len(train_set))
        self.warmup = warmup_steps(cfg.train.warmup, self.total)
        self.state = TrainState()
        self.pad_id = backend.tokenizer.pad_token_id
        self._stop_signal = 0
        # Where the loop's time goes besides the steps (seconds this process spent).
        self.timings = {"validation_s": 0.0, "retention_s": 0.0, "checkpoint_s": 0.0}
        self.retention_scored = 0  # validations at which retention was scored (mlxft.guard_policy)

    # ------------------------------------------------------------------ data

    def _next_step_batches(self) -> tuple[list[Batch], int, int]:
        """This rank's micro-batches for the next optimizer step, with the target and token
        counts of the whole (global) step."""
        s, t = self.state, self.cfg.train
        local, n_targets, n_tokens = [], 0, 0
        for _ in range(t.grad_accumulation):
            indices, s.epoch, s.batch_index = self.order.next(s.epoch, s.batch_index)
            samples = [self.train_set.samples[i] for i in indices]
            n_targets += sum(x.n_targets for x in samples)
            n_tokens += sum(len(x) for x in samples)
            batch = shard(samples, self.world.rank, self.world.size, self.pad_id,
                          t.max_seq_len if t.packing else None)
            if batch is not None:
                local.append(batch)
        return local, n_targets, n_tokens

    def _train_step(self, micro: list, lr: float, n_targets: int):
        """One optimizer step on this rank's micro-batches (preference tuning overrides it)."""
        return self.backend.train_step(micro, lr, n_total=n_targets)

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
        checkpoint.save(self.run.checkpoint, self.backend, self.world, asdict(self.state), writes=self.writes)
        # Every rank took part in this checkpoint (its state was gathered), so every rank records
        # it: a stop on this step must not send the other ranks into a second save alone.
        self.saved_step = self.state.step
        self._delete_candidates(self._stale_candidates)
        self._stale_candidates = []

    def restore_checkpoint(self) -> None:
        self.state = TrainState(**checkpoint.restore(self.resume_from, self.backend, self.world))
        self.saved_step = self.state.step
        if self.writes:
            # Keep only the records up to the checkpoint, so the resumed curve continues it exactly.
            # (retention records of candidates scored at an interruption go: they are scored again)
            rows = [r for r in self.run.metrics()
                    if r.get("step", 0) <= self.state.step and r.get("type") != "retention"]
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
        stopped_early = peer_lost = False
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
                        peer_lost = True
                        raise self._peer_lost(exc, step) from None
                    if stopped_early:
                        break
        except Interrupted:
            if self.selection.score_at == "lazy":
                # The best adapter so far, for a run that is not resumed; the candidates stay
                # for one that is (its checkpoint lists them).
                self._choose_candidate(final=False)
            raise
        finally:
            signal.signal(signal.SIGINT, old_int)
            if peer_lost:
                let_one_terminate_pass()
            else:
                signal.signal(signal.SIGTERM, old_term)
            if metrics is not None:
                metrics.close()
        if self.writes:
            with write_errors("adapter", self.run.last_adapter):
                self.backend.save_adapter(self.run.last_adapter)
        if self.selection.score_at == "lazy":
            self._choose_candidate()
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
        result = self._train_step(micro, lr, n_targets)
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
        """Validation (and retention, where it can change the decision) at `step`: keep the
        adapter if it ranks best, and say whether training should stop."""
        started = time.perf_counter()
        val = self.evaluate()
        self.timings["validation_s"] += time.perf_counter() - started
        ret = None
        if self.selection.needs_retention(self.state, val["loss"]):
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
        verdict = self.selection.observe(self.state, step, val, ret, last_step=step >= self.total)
        if verdict.keep and self.writes:
            with write_errors("best adapter", self.run.best_adapter):
                self.backend.save_adapter(self.run.best_adapter)
        if verdict.candidate and self.writes:
            with write_errors("candidate adapter", self._candidate_dir(step)):
                self.backend.save_adapter(self._candidate_dir(step))
        self._stale_candidates.extend(verdict.dropped)
        if verdict.stop_reason:
            progress.message(f"early stop at step {step}: {verdict.stop_reason}")
        return verdict.stop_reason is not None

    # ------------------------------------------------------------------ retention.score_at: lazy

    @property
    def _candidates_dir(self) -> Path:
        return self.run.path / "candidates"

    def _candidate_dir(self, step: int) -> Path:
        return self._candidates_dir / f"step-{step}"

    def _delete_candidates(self, steps) -> None:
        if self.writes:
            for step in steps:
                shutil.rmtree(self._candidate_dir(step), ignore_errors=True)

    def _choose_candidate(self, final: bool = True) -> None:
        """After training: score the candidates still in the running, lowest validation loss
        first, until the choice is settled (mlxft/candidates.py), and keep the chosen one as
        RUN/adapter-best. The model then holds the chosen adapter (or the last step's, when no
        other was loaded). `final`: remove RUN/candidates/ afterwards. Every rank runs this, as
        scoring is collective."""
        sel, s = self.selection, self.state
        # A checkpoint resumed after its run ended can list candidates already cleared away.
        s.candidates = [c for c in s.candidates if self._candidate_dir(c["step"]).is_dir()]
        loaded = False
        metrics = MetricsWriter(self.run.metrics_file) if self.writes else None
        try:
            while (step := sel.next_to_score(s)) is not None:
                if self.writes:
                    self.backend.load_adapter_weights(self._candidate_dir(step))
                loaded = True
                started = time.perf_counter()
                ret = self._score_retention()
                self.timings["retention_s"] += time.perf_counter() - started
                self.retention_scored += ret is not None
                if metrics and ret:
                    metrics.write({"type": "retention", "step": step, "retention": ret.get("score"),
                                   "changed": ret.get("changed")})
                sel.scored(s, step, ret)
        finally:
            if metrics is not None:
                metrics.close()
        chosen = sel.resolve(s)
        if chosen is not None and self.writes:
            with write_errors("best adapter", self.run.best_adapter), atomic_dir(self.run.best_adapter) as tmp:
                shutil.copytree(self._candidate_dir(chosen), tmp, dirs_exist_ok=True)
            if loaded:
                self.backend.load_adapter_weights(self.run.best_adapter)
        if final and self.writes:
            shutil.rmtree(self._candidates_dir, ignore_errors=True)
