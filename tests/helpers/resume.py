"""Watching a training process from outside: its environment, its metrics as they are written,
and the adapter it leaves (tests/test_resume.py, tests/test_preference.py)."""

import json
import os
import time
from pathlib import Path

def env():
    e = dict(os.environ)
    e["MLXFT_NO_PROGRESS"] = "1"
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return e


def train_losses(run: Path):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"]) for r in rows if r["type"] == "train"], \
           [(r["step"], r["loss"]) for r in rows if r["type"] == "valid"]


def adapter_tensors(folder: Path):
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def wait_for_steps(run: Path, n: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}")
        m = run / "metrics.jsonl"
        if m.exists() and sum('"train"' in l for l in m.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training steps")


def mount_small_tmpfs(mnt: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `mnt`, with huge pages off where the kernel knows the option:
    a machine whose shmem default is huge=always rounds every small file up to 2 MiB, which
    fills a 6 MiB disk with three checkpoint files before the test has begun."""
    import subprocess

    for opts in (f"size={size},huge=never", f"size={size}"):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0:
            return True
    return False


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until the disk is full; a disk that is full already is what was wanted."""
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
    except OSError:
        pass
