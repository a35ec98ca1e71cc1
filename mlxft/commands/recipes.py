"""`mlxft recipes`: list the shipped recipes and show one."""

from __future__ import annotations

import click

from mlxft.commands.options import json_option


@click.group()
def recipes():
    """Shipped training recipes (YAML under recipes/)."""


@recipes.command("list")
@json_option()
def list_cmd(as_json):
    """List recipe names with their one-line description."""
    from mlxft import ui
    from mlxft.config import list_recipes, recipe_path

    rows = []
    for name in list_recipes():
        path = recipe_path(name)
        first = next((l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#") and l[1:].strip()), "")
        rows.append({"name": name, "path": str(path), "description": first})
    if as_json:
        ui.emit_json(rows)
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        ui.result(f"{r['name']:<{width}}  {r['description']}")


@recipes.command("show")
@click.argument("name")
@click.option("--resolved", is_flag=True, help="Show every key with defaults filled in.")
def show(name, resolved):
    """Print recipe NAME (or, with --resolved, the full config it produces)."""
    from mlxft import ui
    from mlxft.config import build_config, recipe_path, to_yaml

    path = recipe_path(name)
    ui.result(to_yaml(build_config(name)) if resolved else path.read_text())
