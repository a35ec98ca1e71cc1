"""`mlxft train`: fine-tune a model with LoRA/DoRA from a recipe."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("recipe", required=False)
@click.option("--model", "-m", help="Base model: Hub repo id, local folder, .gguf file, ollama:NAME, or run dir.")
@click.option("--data", "-d", type=click.Path(), help="Training JSONL (overrides data.train).")
@click.option("--valid", type=click.Path(), help="Validation JSONL (overrides data.valid).")
@click.option("--backend", "-b", type=click.Choice(["auto", "torch", "mlx"]), help="Training backend.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.steps=100.")
@click.option("--steps", type=int, help="Optimizer steps (overrides train.steps).")
@click.option("--out", "-o", type=click.Path(), help="Run directory (default: runs/RECIPE).")
@click.option("--resume", type=click.Path(), help="Continue an interrupted run from its last checkpoint.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip malformed data lines (counted and reported).")
@click.option("--trust-remote-code", is_flag=True, help="Allow Python code shipped inside the model repo to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result summary as JSON on stdout.")
def train(recipe, model, data, valid, backend, sets, steps, out, resume, skip_bad_lines, trust_remote_code, as_json):
    """Fine-tune MODEL on your data with LoRA (or DoRA / QLoRA).

    RECIPE is a name from `mlxft recipes list` or a YAML file. Precedence: defaults < recipe <
    --set < flags. Without --model, the built-in SmolLM2-135M-Instruct is used.

    \b
    Examples:
      mlxft train quickstart
      mlxft train --data my.jsonl --set lora.rank=16 --steps 200
      mlxft train --resume runs/quickstart
    """
    from mlxft import ui
    from mlxft.config import build_config
    from mlxft.pipeline import resume_config, train_run
    from mlxft.runs import default_run_dir

    if resume:
        if recipe or model or data or valid or sets or steps:
            raise click.UsageError("--resume takes the run's own config; give no recipe, --model, --data or --set")
        cfg = resume_config(Path(resume))
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
    try:
        summary = train_run(cfg, out_dir, resume=bool(resume), skip_bad_lines=skip_bad_lines,
                            trust_remote_code=trust_remote_code)
    except Exception as exc:
        from mlxft.errors import Interrupted

        if isinstance(exc, Interrupted):
            ui.console.print(f"Interrupted at step {exc.args[0]}; checkpoint saved. Resume with:\n"
                             f"  mlxft train --resume {out_dir}")
            raise SystemExit(130)
        raise
    if as_json:
        ui.emit_json(summary)
    else:
        best = summary.get("best_val_loss")
        ui.result(f"run: {summary['run']}")
        ui.result(f"steps: {summary['steps']}  best validation loss: {best:.4f} (step {summary['best_step']})"
                  if best is not None else f"steps: {summary['steps']}")
        ui.result(f"trained {summary['tokens']:,} tokens in {summary['train_seconds']:.1f}s "
                  f"({summary['tok_s']:.0f} tokens/s)")
        ret = summary.get("retention")
        if isinstance(ret, dict) and ret.get("score") is not None:
            ui.result(f"retention: {ret['score']:.3f}")
        ui.result(f"try it:  mlxft generate {summary['run']} --prompt \"...\"")
