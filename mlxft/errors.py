"""User-facing errors: one line, exit code 1, traceback only with MLXFT_DEBUG=1."""

from __future__ import annotations

import click


class MlxftError(click.ClickException):
    """An error the user can fix. The message is one line naming the file, line or option."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        text = " ".join(str(message).split("\n"))
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class DataError(MlxftError):
    """Bad training or evaluation data: names the file and line."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.reason = str(path), line, message


class ConfigError(MlxftError):
    """A bad recipe key or value: names the key."""


class ModelError(MlxftError):
    """A model that cannot be found, read or trained."""


class Interrupted(Exception):
    """Training was interrupted after a checkpoint was written (exit 130)."""
