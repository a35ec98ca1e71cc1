"""`mlxft runs`: list run directories with their figures; `mlxft runs show RUN` prints one run's
config and results and draws its loss curves (terminal chart and RUN/loss.png)."""

from __future__ import annotations

import click

from mlxft.commands.options import json_option


class _RunsGroup(click.Group):
    """`mlxft runs [FOLDER]` lists; `mlxft runs show RUN` shows one run."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


def _summary(path) -> dict:
    """One row of the listing, from run.json, config.yaml and metrics.jsonl."""
    from pathlib import Path

    import yaml

    from mlxft.runs import Run

    run = Run(Path(path))
    row = {"run": str(path), "name": Path(path).name}
    try:
        meta = run.meta()
    except Exception as exc:
        return {**row, "status": "unreadable", "error": str(exc)}
    try:
        config = yaml.safe_load(run.config_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    results = meta.get("results") or {}
    metrics = run.metrics()
    train = [r for r in metrics if r.get("type") == "train"]
    valid = [r for r in metrics if r.get("type") == "valid"]
    best = min(valid, key=lambda r: r["loss"]) if valid else None
    retention = results.get("retention") if isinstance(results.get("retention"), dict) else {}
    data = (config.get("data") or {}).get("train")
    row.update(
        model=meta.get("model"), data=data, backend=meta.get("backend"), status=meta.get("status"),
        created=meta.get("created"),
        steps=results.get("steps", train[-1]["step"] if train else meta.get("step", 0)),
        total_steps=meta.get("total_steps", results.get("total_steps")),
        final_val_loss=valid[-1]["loss"] if valid else None,
        best_val_loss=best["loss"] if best else None, best_step=best["step"] if best else None,
        retention=retention.get("score"), early_stopped=results.get("early_stopped"),
    )
    return row


def find_runs(folder) -> list[str]:
    from pathlib import Path

    from mlxft.runs import is_run_dir

    folder = Path(folder)
    if is_run_dir(folder):
        return [str(folder)]
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if is_run_dir(child):
            found.append(str(child))
        elif child.is_dir() and not child.name.startswith("."):
            found.extend(str(g) for g in sorted(child.iterdir()) if is_run_dir(g))
    return found


def _fmt(value, spec="{:.4f}") -> str:
    return "-" if value is None else spec.format(value)


@click.group(cls=_RunsGroup)
def runs():
    """List training runs, or show one.

    \b
      mlxft runs [FOLDER] [--json]     runs under ./runs (or FOLDER)
      mlxft runs show RUN [--json]     config, results and loss curves of RUN
    """


@runs.command("list")
@click.argument("folder", required=False, default="runs", type=click.Path())
@json_option("Print the rows as JSON.")
def list_runs(folder, as_json):
    """List the run directories under FOLDER (default: ./runs): model, data, steps, final and
    best validation loss, retention."""
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from mlxft import ui

    rows = sorted((_summary(p) for p in find_runs(folder)), key=lambda r: (r.get("created") or "", r["run"]))
    if as_json:
        ui.emit_json(rows)
        return
    if not rows:
        ui.info(f"No runs under {folder}. Start one with: mlxft train quickstart")
        return
    table = Table(box=None, pad_edge=False)
    cols = ("run", "model", "data", "steps", "status", "final val", "best val", "retention")
    for col in cols:
        table.add_column(col, justify="right" if col in ("steps", "final val", "best val", "retention") else "left",
                         no_wrap=True)
    for r in rows:
        if r.get("status") == "unreadable":
            table.add_row(r["run"], "-", "-", "-", "unreadable", "-", "-", "-")
            continue
        steps = f"{r['steps']}" + (f"/{r['total_steps']}" if r.get("total_steps") else "")
        best = _fmt(r["best_val_loss"]) + (f" @{r['best_step']}" if r.get("best_step") is not None else "")
        status = (r.get("status") or "-") + (" (early stop)" if r.get("early_stopped") else "")
        table.add_row(r["run"], str(r.get("model") or "-"), Path(r["data"]).name if r.get("data") else "-", steps,
                      status, _fmt(r["final_val_loss"]), best, _fmt(r["retention"], "{:.3f}"))
    width = None if sys.stdout.isatty() else 400
    Console(file=sys.stdout, highlight=False, width=width).print(table)


@runs.command("show")
@click.argument("run_dir", type=click.Path())
@json_option("Print config, results and loss points as JSON.")
@click.option("--png/--no-png", default=True, show_default=True, help="Write RUN/loss.png.")
def show(run_dir, as_json, png):
    """Show RUN_DIR: its config, results, retention, and loss curves drawn in the terminal;
    writes RUN_DIR/loss.png."""
    from pathlib import Path

    import yaml

    from mlxft import ui
    from mlxft.errors import MlxftError
    from mlxft.plot import save_loss_png, split_metrics, terminal_chart
    from mlxft.runs import Run, is_run_dir

    path = Path(run_dir)
    if not is_run_dir(path):
        raise MlxftError(f"{path}: not a run directory (no run.json)", "list runs with `mlxft runs`")
    run = Run(path)
    meta = run.meta()
    config_text = run.config_file.read_text() if run.config_file.is_file() else ""
    rows = run.metrics()
    train, valid = split_metrics(rows)
    png_path = None
    if png and rows:
        try:
            save_loss_png(rows, path / "loss.png", title=f"{meta.get('model')} ({meta.get('backend')})")
            png_path = str(path / "loss.png")
        except OSError as exc:
            ui.warn(f"could not write {path / 'loss.png'}: {exc}")
    summary = _summary(path)
    if as_json:
        ui.emit_json({**summary, "meta": meta, "config": yaml.safe_load(config_text) if config_text else None,
                      "train_loss": train, "valid_loss": valid, "loss_png": png_path})
        return
    out = ui.result
    out(f"run: {path}")
    for key in ("model", "model_path", "backend", "status", "created"):
        if meta.get(key):
            out(f"  {key}: {meta[key]}")
    if config_text:
        out("config:")
        out("\n".join("  " + line for line in config_text.rstrip().splitlines()))
    results = meta.get("results") or {}
    out("results:")
    steps = f"{summary['steps']}" + (f"/{summary['total_steps']}" if summary.get("total_steps") else "")
    out(f"  steps: {steps}" + ("  (stopped early)" if results.get("early_stopped") else ""))
    out(f"  final validation loss: {_fmt(summary['final_val_loss'])}")
    out(f"  best validation loss: {_fmt(summary['best_val_loss'])}"
        + (f" at step {summary['best_step']} (adapter-best, used by fuse/export)" if summary.get("best_step") else ""))
    if results.get("tok_s"):
        out(f"  speed: {results['tok_s']:.0f} tokens/s over {results.get('train_seconds', 0):.1f}s")
    ret = results.get("retention") if isinstance(results.get("retention"), dict) else None
    if ret and ret.get("score") is not None:
        out(f"  retention: {ret['score']:.3f} (top-1 agreement {ret.get('agreement', 0):.3f}, "
            f"{ret.get('adapter', 'last')} adapter; warn below {ret.get('warn_below', '-')})")
        for w in ret.get("worst") or []:
            out(f"    least kept: {w['prompt']!r} ratio {w['ratio']:.3f}")
    elif ret:
        out(f"  retention: - ({ret.get('reason', 'not measured')})")
    if train:
        out("\ntraining loss:")
        out(terminal_chart(train))
    if valid:
        out("\nvalidation loss:")
        out(terminal_chart(valid))
    if png_path:
        out(f"\nwrote {png_path}")
