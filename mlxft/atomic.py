"""Atomic writes: build under a temporary name beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _disk_nearly_full(path: Path | str, slack: int = 1 << 20) -> bool:
    from mlxft.sysinfo import free_disk_bytes

    try:
        return free_disk_bytes(path) < slack
    except OSError:
        return False


@contextlib.contextmanager
def write_errors(what: str, path: Path | str):
    """Turn OS write failures (disk full, read-only, permission) into a one-line user error."""
    from mlxft.errors import MlxftError

    try:
        yield
    except MlxftError:
        raise
    except Exception as exc:
        # safetensors and torch report write failures as their own exception types.
        text = " ".join(str(exc).split())
        if isinstance(exc, OSError) and exc.errno is None and "requested and" in text:
            reason = f"short write, the disk is probably full: {text}"
        elif isinstance(exc, OSError):
            reason = exc.strerror or text
        elif "No space left" in text or "I/O error" in text or "os error" in text:
            reason = "No space left on device" if "No space left" in text else text
        elif "inline_container" in text or _disk_nearly_full(path):
            # torch.save reports a full disk as a RuntimeError from its zip writer.
            reason = "No space left on device" if _disk_nearly_full(path) else f"write failed: {text[:160]}"
        else:
            raise
        raise MlxftError(f"{path}: cannot write {what} ({reason}); anything written before is intact") from None


@contextlib.contextmanager
def atomic_dir(target: Path | str):
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename
    (the old one is moved aside first and removed after). On failure the old target is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path | str) -> bool:
    """If a process died between atomic_dir's two renames, put the previous folder back.
    Returns True when `target` exists afterwards."""
    target = Path(target)
    if target.exists():
        return True
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], target)
        return True
    return False


@contextlib.contextmanager
def atomic_file(target: Path | str, mode: str = "wb"):
    """Yield an open file under a temporary name; rename over `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(target: Path | str) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path for a writer that wants a filename; rename on success."""
    return _atomic_path(Path(target))


@contextlib.contextmanager
def _atomic_path(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
