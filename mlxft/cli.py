"""The `mlxft` command group. Each command lives in mlxft/commands/ and is imported only when run,
so `mlxft --help` stays fast (no torch, transformers or mlx import here)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from mlxft import __version__

# name -> "module:attribute"; modules import heavy libraries inside their functions only.
COMMANDS = {
    "train": "mlxft.commands.train:train",
    "generate": "mlxft.commands.generate:generate",
    "chat": "mlxft.commands.chat:chat",
    "eval": "mlxft.commands.evaluate:eval_command",
    "fuse": "mlxft.commands.fuse:fuse",
    "export": "mlxft.commands.export:export",
    "serve": "mlxft.commands.serve:serve",
    "pull": "mlxft.commands.pull:pull",
    "models": "mlxft.commands.models:models",
    "runs": "mlxft.commands.runs:runs",
    "recipes": "mlxft.commands.recipes:recipes",
    "data": "mlxft.commands.data:data",
    "doctor": "mlxft.commands.doctor:doctor",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxft")
def cli():
    """Fine-tune open LLMs on your own data, locally, and export them for llama.cpp, Ollama and
    LM Studio.

    \b
    Quickstart:
      mlxft train quickstart            # LoRA on the built-in SmolLM2-135M-Instruct
      mlxft generate runs/quickstart --prompt "..."
      mlxft export runs/quickstart -o model.gguf --quant q8_0
    """


def _label_rank(exc: click.ClickException) -> None:
    """Under a launcher, every rank's errors reach the same terminal: say which rank spoke."""
    world = sys.modules.get("mlxft.distributed")
    w = world.get_world() if world else None
    if w is not None and w.distributed and not exc.message.startswith("rank "):
        exc.message = f"[rank {w.rank}] {exc.message}"


def main() -> None:
    """Console-script entry: one-line errors unless MLXFT_DEBUG=1."""
    debug = bool(os.environ.get("MLXFT_DEBUG"))
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        _label_rank(exc)
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug or an unexpected library failure
        if debug:
            raise
        click.echo(f"Error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                   "(run with MLXFT_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
