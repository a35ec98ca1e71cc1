"""The one rich Console (on stderr), progress bars, and result output on stdout."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def is_interactive() -> bool:
    """Progress bars only when stderr is a terminal (and not disabled)."""
    if os.environ.get("MLXFT_NO_PROGRESS"):
        return False
    return console.is_terminal


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def emit_json(data: Any) -> None:
    """Results go to stdout; this is what --json prints."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def result(text: str) -> None:
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    sys.stdout.flush()
