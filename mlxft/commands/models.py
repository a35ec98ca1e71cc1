"""`mlxft models`: list the models on this machine; `mlxft models rm` removes one."""

from __future__ import annotations

import click

from mlxft.commands.options import json_option


@click.group(invoke_without_command=True)
@json_option("Print the list as JSON.")
@click.pass_context
def models(ctx, as_json):
    """List models in the Hugging Face cache and GGUF imports, offline.

    For each: repo, revision, size on disk, quantization, architecture, and whether the torch
    and mlx backends can train it. `mlxft models rm REPO` removes one.
    """
    if ctx.invoked_subcommand is not None:
        return
    import sys

    from rich import filesize
    from rich.console import Console
    from rich.table import Table

    from mlxft import ui
    from mlxft.sources.catalog import list_models

    rows = list_models()
    if as_json:
        ui.emit_json(rows)
        return
    if not rows:
        ui.info("No models cached yet. Try: mlxft pull HuggingFaceTB/SmolLM2-135M-Instruct")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("model", "revision", "size", "quantization", "architecture", "torch", "mlx"):
        table.add_column(col, justify="right" if col == "size" else "left", no_wrap=col != "model")
    mark = {True: "yes", False: "no"}
    for r in rows:
        rev = (r["revision"] or "")[:12] + (f" ({','.join(r['refs'])})" if r["refs"] else "")
        name = r["repo"] + ("" if r["complete"] else f" [incomplete: {r['problem']}]")
        table.add_row(name, rev, filesize.decimal(r["size_bytes"]), r["quantization"], r["architecture"],
                      mark[r["backends"]["torch"]], mark[r["backends"]["mlx"]])
    # never truncate names when piped; rows are single lines a script can grep
    width = None if sys.stdout.isatty() else 400
    Console(file=sys.stdout, highlight=False, width=width).print(table)


@models.command("rm")
@click.argument("model")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(model, yes):
    """Remove MODEL from the cache: ORG/NAME (all revisions), ORG/NAME@REV (one revision), or
    the name of an imported GGUF model as `mlxft models` shows it."""
    from mlxft import ui
    from mlxft.sources.catalog import remove_model

    if not yes:
        click.confirm(f"Remove {model} from the cache?", abort=True, err=True)
    for item in remove_model(model):
        ui.result(f"removed {item}")
