"""Running `mlxft train` as one process, under torchrun and under mlx.launch, and comparing the
adapters and metrics the runs leave (tests/test_distributed.py, tests/test_preference_distributed.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LR, STEPS = 1e-2, 6
BASE_SETS = ["train.batch_size=4", f"train.learning_rate={LR}", "train.eval_every=3", "train.save_every=2",
             "train.dtype=float32", "retention.enabled=false", "lora.dropout=0.0"]


# ---------------------------------------------------------------------------- helpers


def env(marker: str | None = None) -> dict:
    e = dict(os.environ)
    e.update(MLXFT_NO_PROGRESS="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK", "MASTER_ADDR"):
        e.pop(k, None)
    if marker:
        e["MLXFT_TEST_MARK"] = marker
    return e


def train_args(model: Path, data: Path, out: Path, sets=(), steps=STEPS) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(out)]
    for s in [f"train.steps={steps}", *BASE_SETS, *sets]:
        args += ["--set", s]
    return args


def single(args) -> list[str]:
    return [sys.executable, "-m", "mlxft", *args]


def torchrun(args, n=2) -> list[str]:
    port = random.randint(20000, 40000)
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port", str(port),
            "--no-python", sys.executable, "-m", "mlxft", *args]


def mlx_launch(args, n=2) -> list[str]:
    port = random.randint(20000, 40000)
    return [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(n), "--starting-port", str(port),
            "--python", sys.executable, "--", "-m", "mlxft", *args]


def run(cmd, marker=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(marker), capture_output=True, text=True, timeout=timeout)


def adapter(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# Two ranks against one: what float32 allows, and what a bug looks like.
#
# The two runs add the same float32 terms in a different order: each rank sums its own shard's
# micro-batches, the all-reduce adds the partial sums, and with packing or uneven shards the
# padded shapes differ too, so the matmuls block differently. Each gradient element then differs
# by about u * sqrt(n) relative (u = 2**-24 ~ 6e-8, n = terms summed): r ~ 1e-6; measured as the
# relative difference of the per-step gradient norms, 1.3e-6 (the figures here: "Intel(R) Xeon(R)
# Processor", 2 cores, avx512_bf16 and amx_bf16; the run trains in float32).
#
# AdamW turns a gradient into lr * m / (sqrt(v) + eps), eps = 1e-8. Where sqrt(v) >> eps the update
# moves by about lr * r per step (~1e-8 here); over the run that is lr * steps * r ~ 1e-7, which is
# what nearly every element shows (99th percentile 7e-8). But where an element's gradients are
# near zero by cancellation (|g| ~ eps while the rounding of its sum is r * |terms| ~ eps), the
# update lr * g / (|g| + eps) has slope lr / eps: rounding can move it by up to ~lr in one step,
# and by up to lr * steps over the run, the most Adam can move any weight. Such elements are
# rare but real: the 6.9e-5 that broke a 1e-5 maximum on a Xeon was one element of 16,384 (the
# next largest were ~6e-6 and 3e-6). So no maximum below lr * steps follows from the arithmetic.
#
# The check is therefore: every element finite and within lr * steps; at most 1 in 1,000
# elements further than 1e-4 * lr * steps (r ~ 1e-4: a hundred times the rounding above); the
# per-step gradient norms and losses within 1e-3 relative (rounding gives ~1e-6; an outlier
# element's drift feeds into later steps far below that: 1.3e-6 and 2e-7 measured with the 6.9e-5
# element). A rank whose gradient is missing moves almost every element by O(lr) (measured: 99.5%
# of elements beyond the bound, gradient norms 32% off). A wrong divisor (say, averaging the
# ranks' gradients instead of summing them) scales the gradient uniformly, which Adam's
# normalisation and the norm clipping cancel: the adapters then agree to 2.5e-5 (measured), so
# only the gradient norm sees it, off by the wrong factor (0.5 for two ranks).
AGREE_SHARE, RTOL = 1e-3, 1e-3


def assert_same_training(one: Path, two: Path, lr: float, steps: int) -> None:
    a, b = adapter(one / "adapter"), adapter(two / "adapter")
    assert a.keys() == b.keys()
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert np.isfinite(diff).all() and diff.max() <= lr * steps, diff.max()
    beyond = float((diff > 1e-4 * lr * steps).mean())
    assert beyond <= AGREE_SHARE, (f"{beyond:.1%} of adapter elements differ by more than {1e-4 * lr * steps:.1e} "
                                   f"(largest {diff.max():.2e})")
    rows_one, rows_two = train_rows(one), train_rows(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for x, y in zip(rows_one, rows_two):
        assert x["tokens"] == y["tokens"], (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= RTOL * x["grad_norm"], (x, y)
        assert abs(x["loss"] - y["loss"]) <= RTOL * abs(x["loss"]), (x, y)


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["type"] == "train"]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the training process of `rank` among those started with `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLXFT_TEST_MARK={marker}".encode() not in environ or b"\0-m\0mlxft\0" not in cmdline:
            continue
        if f"RANK={rank}".encode() in environ or f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None
