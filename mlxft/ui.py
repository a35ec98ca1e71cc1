"""The one rich Console (on stderr), progress bars, and result output on stdout."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


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


def quiet_libraries() -> None:
    """Silence library progress bars and deprecation chatter that would bury mlxft's own output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


@contextlib.contextmanager
def progress_frames_dropped():
    """Drop the carriage-return progress frames a library writes straight to stderr during the
    block; anything else it writes there still comes through, and mlxft's console keeps drawing.
    For bars no public switch reaches: transformers' GGUF loader draws "Converting and
    de-quantizing GGUF tensors" with tqdm itself, which `disable_progress_bar` leaves on."""
    real, captured = sys.stderr, io.StringIO()
    follows_stderr = console.file is getattr(real, "rich_proxied_file", real)
    if follows_stderr:
        console.file = console.file  # keep drawing on the real stderr while sys.stderr is swapped
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if follows_stderr:
            console.file = None  # back to following sys.stderr
        real.write("".join(line + "\n" for line in captured.getvalue().split("\n") if line.strip() and "\r" not in line))
