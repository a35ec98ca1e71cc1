"""`mlxft train` end to end: resolve the model, pick the backend, load and split the data,
create the run directory, train, record results and plot the curves."""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path

from mlxft import ui
from mlxft.config import Config, build_config, to_yaml
from mlxft.data import Dataset, load_dataset, split_dataset
from mlxft.errors import ConfigError, MlxftError
from mlxft.runs import Run, create_run, is_run_dir


def load_data(cfg: Config, tokenizer, skip_bad_lines: bool = False) -> tuple[Dataset, Dataset]:
    if not cfg.data.train:
        raise ConfigError("data.train: no training data", "pass --data FILE.jsonl or set data.train in the recipe")
    kw = dict(max_seq_len=cfg.train.max_seq_len, mask_prompt=cfg.train.mask_prompt,
              system_prompt=cfg.data.system_prompt, skip_bad_lines=skip_bad_lines)
    train = load_dataset(cfg.data.train, tokenizer, **kw)
    if cfg.data.valid:
        valid = load_dataset(cfg.data.valid, tokenizer, **kw)
    else:
        train, valid = split_dataset(train, cfg.data.valid_split, cfg.seed)
    for ds in (train, valid):
        if ds.truncated:
            ui.warn(f"{ds.path}: {ds.truncated} samples longer than train.max_seq_len={cfg.train.max_seq_len} "
                    "were truncated")
        if ds.skipped:
            ui.warn(f"{ds.path}: skipped {len(ds.skipped)} bad lines (first: {ds.skipped[0]})")
    return train, valid


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def train_run(cfg: Config, out: Path, *, resume: bool = False, skip_bad_lines: bool = False,
              trust_remote_code: bool = False) -> dict:
    from mlxft.backends.select import choose_backend, make_backend
    from mlxft.sources import resolve_model
    from mlxft.trainer import Trainer

    backend_name, why = choose_backend(cfg.backend)
    resolved = resolve_model(cfg.model)
    backend = make_backend(backend_name, cfg)
    backend.trust_remote_code = trust_remote_code
    if resume:
        run = Run(out)
        start_adapter = run.checkpoint / "adapter"
    else:
        start_adapter = resolved.adapter  # a run directory as --model continues from its adapter
    with ui.console.status(f"Loading {resolved.spec} on {backend_name}"):
        backend.load(resolved.path, adapter=start_adapter, train=True)
    train_set, valid_set = load_data(cfg, backend.tokenizer, skip_bad_lines)
    if not resume:
        run = create_run(out, model=resolved.spec, model_path=str(resolved.path.resolve()),
                         revision=resolved.revision, source=resolved.source, backend=backend_name,
                         backend_reason=why, status="running")
        (run.path / "config.yaml").write_text(to_yaml(cfg))
    trainable, total = backend.trainable_parameters()
    ui.info(f"[bold]mlxft train[/bold] {resolved.spec} -> {run.path}  backend={backend_name} "
            f"({why}) device={backend.device_name()} dtype={backend.dtype_name()}")
    ui.info(f"data: {len(train_set)} train / {len(valid_set)} valid samples ({train_set.fmt}); "
            f"LoRA{'/DoRA' if cfg.lora.type == 'dora' else ''} r={cfg.lora.rank} alpha={cfg.lora.alpha}: "
            f"{trainable:,} trainable of {total:,} parameters")
    retention = _optional("mlxft.retention") if (cfg.retention.enabled or cfg.data.replay) else None
    if retention is not None and not resume:
        retention.before_training(cfg, run, backend)
    if retention is not None and cfg.data.replay > 0:
        train_set.samples.extend(retention.replay_samples(cfg, run, backend.tokenizer, len(train_set)))
    trainer = Trainer(cfg, run, backend, train_set, valid_set)
    run.update_meta(status="running", total_steps=trainer.total)
    started = time.time()
    try:
        summary = trainer.train(resume=resume)
    except BaseException as exc:
        from mlxft.errors import Interrupted

        with contextlib.suppress(OSError):  # a full disk must not hide the original error
            if isinstance(exc, Interrupted):
                run.update_meta(status="interrupted", step=exc.args[0])
            elif isinstance(exc, MlxftError):
                run.update_meta(status="failed", error=exc.message)
        raise
    summary["wall_seconds"] = round(time.time() - started, 2)
    if retention is not None:
        summary["retention"] = retention.after_training(cfg, run, backend)
    from mlxft.plot import save_loss_png

    save_loss_png(run.metrics(), run.path / "loss.png", title=f"{resolved.spec} ({backend_name})")
    run.update_meta(status="done", results=summary)
    summary["run"] = str(run.path)
    return summary


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
    cfg = build_config(str(Path(run_dir) / "config.yaml"))
    return cfg
