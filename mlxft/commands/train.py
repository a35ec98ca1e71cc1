"""`mlxft train`: fine-tune a model with LoRA/DoRA from a recipe."""

from __future__ import annotations

from pathlib import Path

import click

from mlxft.commands.options import (DATA_FORMATS, backend_option, json_option, output_option, set_option,
                                   skip_bad_lines_option, trust_remote_code_option)
from mlxft.guard_policy import LEARNED_SHARE


@click.command()
@click.argument("recipe", required=False)
@click.option("--model", "-m", help="Base model: Hub repo id, local folder, .gguf file, ollama:NAME, or run dir.")
@click.option("--data", "-d", type=click.Path(), help=f"Training data: {DATA_FORMATS} (overrides data.train).")
@click.option("--valid", type=click.Path(), help="Validation data, same formats (overrides data.valid).")
@backend_option(default=None, help="Training backend (default: the recipe's, else auto).")
@set_option()
@click.option("--steps", type=int, help="Optimizer steps (overrides train.steps).")
@output_option("out", help="Run directory (default: runs/RECIPE).")
@click.option("--resume", type=click.Path(), help="Continue an interrupted run from its last checkpoint.")
@skip_bad_lines_option()
@trust_remote_code_option()
@json_option("Print the result summary as JSON on stdout.")
@click.option("--nproc", type=click.IntRange(min=1), help="Data-parallel ranks per host, started with torchrun "
              "(torch) or mlx.launch (mlx).")
@click.option("--hosts", help="MLX: comma-separated hosts (IPs for the ring backend) to train across, via mlx.launch.")
@click.option("--hostfile", type=click.Path(), help="MLX: an mlx.launch hostfile (see mlx.distributed_config).")
def train(recipe, model, data, valid, backend, sets, steps, out, resume, skip_bad_lines, trust_remote_code, as_json,
          nproc, hosts, hostfile):
    """Fine-tune MODEL on your data with LoRA (or DoRA / QLoRA).

    RECIPE is a name from `mlxft recipes list` or a YAML file. Precedence: defaults < recipe <
    --set < flags. Without --model, the built-in SmolLM2-135M-Instruct is used.

    \b
    Examples:
      mlxft train quickstart
      mlxft train --data my.jsonl --set lora.rank=16 --steps 200
      mlxft train --resume runs/quickstart
      mlxft train quickstart --nproc 2            # two data-parallel ranks here
      torchrun --nproc-per-node 4 -m mlxft train quickstart
      mlx.launch --hostfile hosts.json --python PYTHON -- -m mlxft train quickstart
    """
    import tempfile

    from mlxft import ui
    from mlxft.config import build_config
    from mlxft.distributed import init_world, reset_world
    from mlxft.pipeline import resume_source, train_run
    from mlxft.runs import default_run_dir

    world = init_world()
    if (nproc or hosts or hostfile) and world.distributed:
        raise click.UsageError("--nproc/--hosts/--hostfile start a launcher; this process already runs under "
                               f"{world.launcher}")
    if not world.is_root:
        ui.console.quiet = True  # rank 0 speaks for the run; errors still reach stderr
    keep = tempfile.TemporaryDirectory(prefix="mlxft-resume-") if world.distributed and not world.is_root else None
    resume_from = None
    if resume:
        if recipe or model or data or valid or sets or steps:
            raise click.UsageError("--resume takes the run's own config; give no recipe, --model, --data or --set")
        cfg, resume_from = resume_source(world, Path(resume), Path(keep.name) if keep else None)
        if backend:
            cfg.backend = backend
        out_dir = Path(resume)
    else:
        flags = {"model": model, "backend": backend,
                 "data": {"train": data, "valid": valid}, "train": {"steps": steps}}
        if steps is not None:
            flags["train"]["epochs"] = None
        cfg = build_config(recipe, sets, flags)
        if steps is not None:
            cfg.train.epochs = None
        name = Path(recipe).stem if recipe else "run"
        out_dir = Path(out) if out else default_run_dir(name)
        if world.distributed:  # rank 0 picked runs/NAME-N; the others name the same directory
            out_dir = Path(world.broadcast_bytes(str(out_dir).encode()).decode())
    if nproc or hosts or hostfile:
        raise SystemExit(_launch(cfg, out_dir, nproc, hosts, hostfile, explicit_out=bool(out or resume)))
    try:
        summary = train_run(cfg, out_dir, resume=bool(resume), skip_bad_lines=skip_bad_lines,
                            trust_remote_code=trust_remote_code, resume_from=resume_from)
    except Exception as exc:
        from mlxft.errors import Interrupted

        if isinstance(exc, Interrupted):
            from mlxft.distributed import resume_command

            ui.console.print(f"Interrupted at step {exc.args[0]}; checkpoint saved. Resume with:\n"
                             f"  {resume_command(world, out_dir)}")
            raise SystemExit(130)
        raise
    finally:
        if keep is not None:
            keep.cleanup()
    reset_world()
    if not world.is_root:
        return
    if as_json:
        ui.emit_json(summary)
    else:
        ui.result(f"run: {summary['run']}")
        for line in verdict_lines(summary):
            ui.result(line)
        ui.result(f"trained {summary['tokens']:,} tokens in {summary['train_seconds']:.1f}s "
                  f"({summary['tok_s']:.0f} tokens/s)")
        t = summary.get("timings") or {}
        parts = [("load", "load_s"), ("baseline+replay", "baseline_and_replay_s"), ("replay teacher", "replay_teacher_s"),
                 ("validation", "validation_s"),
                 ("retention", "retention_s"), ("checkpoints", "checkpoint_s")]
        g = summary.get("guard") or {}
        guard = (f"; guard {g['seconds']:.1f}s = {g['share']:.0%} of {g['total_s']:.0f}s"
                 if g.get("share") is not None and g.get("seconds") else "")
        ui.result("time:    " + ", ".join(f"{label} {t[key]:.1f}s" for label, key in parts if key in t)
                  + f", steps {summary['train_seconds']:.1f}s{guard}")
        ui.result(f"try it:  mlxft generate {summary['run']} --prompt \"...\"")


def verdict_lines(summary: dict) -> list[str]:
    """The end-of-run reading: learned (validation before/after), kept (retention), chosen."""
    v = summary.get("verdict") or {}
    lines = []
    before, after = v.get("val_loss_before"), v.get("val_loss_after")
    if before is not None and after is not None:
        acc, pref = "", v.get("method") in ("dpo", "orpo")
        if v.get("accuracy_before") is not None and v.get("accuracy_after") is not None:
            what = "held-out preference accuracy" if pref else "next-token accuracy"
            acc = f", {what} {v['accuracy_before']:.0%} -> {v['accuracy_after']:.0%}"
        loss = f"validation {v['method'].upper()} loss" if pref else "validation loss"
        share, partly = v.get("learned_share"), ""
        if share is not None and share < LEARNED_SHARE:
            partly = (f" - only {share:.0%} of the run's fall (to {v['best_val_loss']:.3f}): the adapters that "
                      "learned more forgot more; raise data.replay, or lower retention.floor")
        lines.append(f"learned: {loss} {before:.3f} -> {after:.3f}{acc}"
                     + ("" if v.get("learned") else " (no improvement)") + partly)
    if v.get("retention") is not None:
        floor = f" (floor {v['floor']:g})" if v.get("floor") else ""
        changed = ""
        if v.get("changed") is not None:
            cap = f", at most {v['max_changed']}" if v.get("max_changed") is not None else ""
            changed = f", {v['changed']} of {v['probes']} probe answers changed{cap}"
        missed = (f" - under the floor by {v['floor'] - v['retention']:.3f}, within retention.floor_margin="
                  f"{v['floor_margin']:g}: no adapter that learned met the floor" if v.get("near_floor")
                  else " - the guard was not met: no adapter kept the base model well enough")
        lines.append(f"kept:    retention {v['retention']:.3f}{floor}{changed}" + ("" if v.get("kept") else missed))
        for c in v.get("answers_changed") or []:
            # counted: the per-probe rule flagged it; differs: regenerated differently, but the
            # base's answer is still about as likely (a rewording, or a near-tie)
            lines.append(f"         {'changed' if c['flagged'] else 'differs'}: {_short(c['prompt'])!r}: "
                         f"{_short(c['base'])!r} -> {_short(c['tuned'])!r}")
    if v.get("chosen_step") is not None:
        why = ("the lowest validation loss among those meeting the guard" if v.get("floor") and v.get("kept")
               else "the lowest validation loss among those that learned, near the floor" if v.get("near_floor")
               else "the highest retention reached" if v.get("floor") and v.get("retention") is not None
               else "the lowest validation loss")
        stop = f"; stopped early at step {summary['steps']}: {v['stop_reason']}" if v.get("stop_reason") else ""
        lines.append(f"chosen:  the adapter of step {v['chosen_step']} of {summary['steps']} ({why}){stop}")
    return lines


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _launch(cfg, out_dir: Path, nproc, hosts, hostfile, explicit_out: bool) -> int:
    import sys

    from mlxft.backends.select import choose_backend
    from mlxft.launch import launcher_command, run_launcher

    backend, _ = choose_backend(cfg.backend)
    argv = sys.argv[1:]
    if not explicit_out:  # every rank must name the directory this process will read back
        argv = [*argv, "--out", str(out_dir)]
    return run_launcher(launcher_command(backend, argv, nproc, hosts, hostfile), out_dir)
