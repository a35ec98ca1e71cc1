"""`mlxft train` end to end: resolve the model, pick the backend, load and split the data,
create the run directory, train, record results and plot the curves."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np

from mlxft import ui
from mlxft.config import Config, to_yaml
from mlxft.data import Dataset, Sample
from mlxft.errors import MlxftError
from mlxft.runs import Run, create_run, is_run_dir


def load_data(cfg: Config, tokenizer, skip_bad_lines: bool = False) -> tuple[Dataset, Dataset]:
    from mlxft.training_data import training_sets

    train, valid = training_sets(cfg, tokenizer, skip_bad_lines=skip_bad_lines)
    for ds in (train, valid):
        if ds.truncated:
            ui.warn(f"{ds.path}: {ds.truncated} samples longer than train.max_seq_len={cfg.train.max_seq_len} "
                    "were truncated")
        if ds.skipped:
            ui.warn(f"{ds.path}: skipped {len(ds.skipped)} bad lines (first: {ds.skipped[0]})")
    from mlxft.datacheck import report_at_train_start

    report_at_train_start(train, valid, tokenizer, cfg.train.max_seq_len)
    return train, valid


def _share_replay(world, samples: list[Sample] | None) -> list[Sample]:
    """Rank 0 recorded the base model's answers; every rank trains on the same replay samples."""
    if not world.distributed:
        return samples or []
    def soft(s):
        return None if s.soft is None else [s.soft[0].tolist(), s.soft[1].tolist()]

    def unsoft(x):
        return None if x is None else (np.asarray(x[0], dtype=np.int64), np.asarray(x[1], dtype=np.float32))

    blob = json.dumps([[s.ids, s.targets, s.source, soft(s)] for s in samples or []]).encode() if world.is_root \
        else None
    return [Sample(ids, targets, source, unsoft(x)) for ids, targets, source, x in json.loads(world.broadcast_bytes(blob))]


def train_run(cfg: Config, out: Path, *, resume: bool = False, skip_bad_lines: bool = False,
              trust_remote_code: bool = False, resume_from: Path | None = None) -> dict:
    """Train one run. In a distributed world every rank calls this; `resume_from` is where this
    rank reads the checkpoint (rank 0: RUN/checkpoint; others: the copy rank 0 sent them)."""
    from mlxft.backends.select import choose_backend, make_backend
    from mlxft.distributed import backend_for_launcher, get_world
    from mlxft.rank_agreement import check_agreement, fingerprint
    from mlxft.sources import resolve_model
    from mlxft.trainer import Trainer

    world = get_world()
    backend_name, why = choose_backend(backend_for_launcher(world.launcher if world.distributed else None,
                                                            cfg.backend))
    if world.distributed:
        why = f"{world.size} ranks under {world.launcher}" if cfg.backend == "auto" else \
            f"{why}; {world.size} ranks under {world.launcher}"
    resolved = resolve_model(cfg.model)
    backend = make_backend(backend_name, cfg, world)
    backend.trust_remote_code = trust_remote_code
    run = Run(out)
    if resume:
        start_adapter = Path(resume_from or run.checkpoint) / "adapter"
    else:
        start_adapter = resolved.adapter  # a run directory as --model continues from its adapter
    timings = {}
    clock = clock_start = time.perf_counter()
    with ui.console.status(f"Loading {resolved.spec} on {backend_name}"):
        backend.load(resolved.path, adapter=start_adapter, train=True)
    timings["load_s"] = round(time.perf_counter() - clock, 2)
    from mlxft.templates import for_training, record

    chat = for_training(backend.tokenizer, cfg.data.system_prompt, run.path if resume else None)
    backend.chat_setup = chat  # retention and replay answers stop at its end-of-turn token
    preference = cfg.train.method != "sft"
    pref_chosen = None
    if preference:  # dpo / orpo: pairs (mlxft/preference/)
        from mlxft.preference.setup import load_pair_data, preference_defaults

        train_set, valid_set = load_pair_data(cfg, backend.tokenizer, skip_bad_lines)
        pref_chosen = preference_defaults(cfg, len(train_set), backend.hidden_size())
    else:
        train_set, valid_set = load_data(cfg, backend.tokenizer, skip_bad_lines)
    from mlxft.defaults import resolve

    own_format = chat.source == "model"
    chosen = resolve(cfg, len(train_set), backend.hidden_size(), own_format)  # before config.yaml: --resume repeats it
    chosen = "; ".join(x for x in (pref_chosen, chosen) if x) or None
    if world.distributed:  # hashing every token is start-up work a single process need not do
        check_agreement(world, fingerprint(cfg, resolved.path, start_adapter, backend_name, train_set, valid_set))
    if not resume and world.is_root:
        run = create_run(out, model=resolved.spec, model_path=str(resolved.path.resolve()),
                         revision=resolved.revision, source=resolved.source, backend=backend_name,
                         backend_reason=why, status="running", world_size=world.size, defaults_chosen=chosen)
        (run.path / "config.yaml").write_text(to_yaml(cfg))
        record(run.path, chat)
    trainable, total = backend.trainable_parameters()
    ui.info(f"[bold]mlxft train[/bold] {resolved.spec} -> {run.path}  backend={backend_name} "
            f"({why}) device={backend.device_name()} dtype={backend.dtype_name()}")
    ui.info(f"data: {len(train_set)} train / {len(valid_set)} valid {'pairs' if preference else 'samples'} "
            f"({train_set.fmt}{', ' + cfg.train.method if preference else ''}); "
            f"LoRA{'/DoRA' if cfg.lora.type == 'dora' else ''} r={cfg.lora.rank} alpha={cfg.lora.alpha}: "
            f"{trainable:,} trainable of {total:,} parameters")
    if chosen:
        ui.info(f"defaults: {chosen}")
    if cfg.retention.enabled or cfg.data.replay:
        from mlxft import retention
    else:
        retention = None
    # Retention baselines and replay answers are generated once, by rank 0, into the run directory.
    if retention is not None and not resume and world.is_root:
        clock = time.perf_counter()
        retention.before_training(cfg, run, backend, len(train_set))
        timings["baseline_and_replay_s"] = round(time.perf_counter() - clock, 2)
    n_task = len(train_set)
    if retention is not None and cfg.data.replay > 0:
        from mlxft.replay import replay_samples

        replay = replay_samples(cfg, run, backend.tokenizer, len(train_set)) if world.is_root else None
        if replay and cfg.data.replay_distill:
            from mlxft.replay_distill import attach_teacher

            clock = time.perf_counter()
            attach_teacher(cfg, run, backend, replay, resume)
            timings["replay_teacher_s"] = round(time.perf_counter() - clock, 2)
        replay = _share_replay(world, replay)
        if preference:  # NLL-only samples after the pairs (mlxft/preference/trainer.py)
            train_set.replay = replay
        else:
            train_set.samples.extend(replay)
    track = retention.tracker(run, backend) if retention is not None and cfg.retention.enabled and world.is_root \
        else None
    if preference:
        from mlxft.preference.setup import references
        from mlxft.preference.trainer import PreferenceTrainer

        clock = time.perf_counter()
        refs = references(cfg, run, backend, world, train_set, valid_set, resolved.adapter, resume)
        if refs:
            timings["reference_s"] = round(time.perf_counter() - clock, 2)
        trainer = PreferenceTrainer(cfg, run, backend, train_set, valid_set, references=refs,
                                    resume_from=resume_from, retention=track)
    else:
        trainer = Trainer(cfg, run, backend, train_set, valid_set, resume_from=resume_from, retention=track)
    if world.is_root:
        run.update_meta(status="running", total_steps=trainer.total)
    started = time.time()
    try:
        summary = trainer.train(resume=resume)
    except BaseException as exc:
        from mlxft.errors import Interrupted

        with contextlib.suppress(OSError):  # a full disk must not hide the original error
            if world.is_root and isinstance(exc, Interrupted):
                run.update_meta(status="interrupted", step=exc.args[0])
            elif world.is_root and isinstance(exc, MlxftError):
                run.update_meta(status="failed", error=exc.message)
        raise
    summary["wall_seconds"] = round(time.time() - started, 2)
    summary["timings"] = {**timings, **summary["timings"]}
    if not world.is_root:
        return {**summary, "run": str(run.path)}
    if retention is not None:
        summary["retention"] = retention.after_training(cfg, run, summary, backend)
    from mlxft.guard_cost import guard_time

    summary["guard"] = guard_time(summary, train_set.samples[n_task:], train_set.samples,
                                  time.perf_counter() - clock_start)
    summary["verdict"] = verdict(cfg, summary)
    from mlxft.plot import save_loss_png

    save_loss_png(run.metrics(), run.path / "loss.png", title=f"{resolved.spec} ({backend_name})")
    run.update_meta(status="done", results=summary)
    summary["run"] = str(run.path)
    return summary


def verdict(cfg: Config, summary: dict) -> dict:
    """One reading of the run: what was learned, what was kept, which adapter was chosen."""
    first, chosen = summary.get("initial_val") or {}, summary.get("chosen_step")
    ret = summary.get("retention") or {}
    out = {"val_loss_before": first.get("loss"), "val_loss_after": summary.get("chosen_val_loss"),
           "accuracy_before": first.get("accuracy"), "accuracy_after": summary.get("chosen_accuracy"),
           "retention": ret.get("score"),
           "floor": cfg.retention.floor if cfg.retention.enabled else None, "chosen_step": chosen,
           "stop_reason": summary.get("stop_reason"), "method": cfg.train.method,
           "probes": ret.get("probes"), "changed": ret.get("changed"),
           "max_changed": cfg.retention.max_changed if cfg.retention.enabled else None,
           "floor_margin": cfg.retention.floor_margin if cfg.retention.enabled else None,
           "answers_changed": ret.get("answers_changed")}
    learned = (out["val_loss_before"] is not None and out["val_loss_after"] is not None
               and out["val_loss_after"] < out["val_loss_before"])
    from mlxft.guard_policy import NEAR_FLOOR_TIER, Guard, learned_below, learned_share

    guard = Guard(out["floor"], out["max_changed"], out["floor_margin"]) if out["floor"] is not None else None
    kept = guard is None or guard.meets(ret)
    out["learned"], out["kept"] = learned, kept
    # how much of the run's fall in validation loss the kept adapter made: under 90% where the
    # guard kept an adapter from before the run learned (mlxft/guard_policy.py)
    out["best_val_loss"] = summary.get("best_val_loss")
    out["learned_share"] = learned_share(out["val_loss_before"], out["best_val_loss"], out["val_loss_after"])
    # kept by the floor margin: it learned and reads under the floor by less than the margin
    out["near_floor"] = (guard is not None and out["retention"] is not None and out["val_loss_after"] is not None
                         and guard.tier(out["val_loss_after"], ret, learned_below(out["val_loss_before"],
                                                                                 out["best_val_loss"]))
                         == NEAR_FLOOR_TIER)
    return out


def resume_config(run_dir: Path) -> Config:
    if not is_run_dir(run_dir):
        raise MlxftError(f"--resume {run_dir}: not a run directory (no run.json)")
    from mlxft.atomic import recover_dir

    recover_dir(Path(run_dir) / "checkpoint")
    if not (Path(run_dir) / "checkpoint" / "trainer.json").is_file():
        raise MlxftError(f"--resume {run_dir}: the run has no checkpoint yet; start it again instead")
    meta = Run(Path(run_dir)).meta()
    if meta.get("status") == "done":
        raise MlxftError(f"--resume {run_dir}: the run already finished")
    return Run(Path(run_dir)).config()


def resume_source(world, run_dir: Path, keep: Path | None) -> tuple[Config, Path]:
    """(config, checkpoint folder this rank reads) for --resume. In a distributed world rank 0
    checks the run and sends its config and checkpoint to the other ranks, which may be on
    hosts that do not have the run directory; `keep` is where they unpack it."""
    from mlxft.distributed import bytes_to_dir, dir_to_bytes

    if not world.distributed:
        return resume_config(run_dir), Path(run_dir) / "checkpoint"
    if world.is_root:
        try:
            cfg = resume_config(run_dir)
            blob = dir_to_bytes(Path(run_dir), members=["config.yaml", "checkpoint"])
        except MlxftError as exc:
            world.broadcast_bytes(b"\0" + exc.message.encode())
            raise
        world.broadcast_bytes(blob)
        return cfg, Path(run_dir) / "checkpoint"
    blob = world.broadcast_bytes(None)
    if blob.startswith(b"\0"):
        raise MlxftError(f"--resume {run_dir}: rank 0 could not resume ({blob[1:].decode()})")
    bytes_to_dir(blob, keep)
    return Run(keep).config(), keep / "checkpoint"
