"""Data-parallel benchmark: `mlxft train` with 1 and with N local ranks, under torchrun (PyTorch,
gloo on CPU / NCCL on CUDA) and under mlx.launch (MLX, ring backend), same recipe and global batch.

    python scripts/bench_distributed.py                       # SmolLM2-135M, quickstart recipe, torch
    python scripts/bench_distributed.py --mlx --mlx-steps 4   # also the MLX backend (slow on CPU)

Each configuration is a fresh `mlxft train` of --steps optimizer steps on the quickstart recipe
(retention off). Reported per run, from the run directory rank 0 wrote: trained tokens/s over the
step time (global tokens, every rank's shard counted once), the wall time of the launch, and the
final training loss; then the N-rank to 1-rank ratios. On one machine the ranks share its cores
(each rank gets cores/N threads), so this measures the cost of the data-parallel machinery, not
a speed-up: that needs ranks on separate machines or GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def launch(backend: str, ranks: int, args: list[str]) -> list[str]:
    mlxft = ["-m", "mlxft", "train", *args, "--backend", backend]
    if ranks == 1:
        return [sys.executable, *mlxft]
    port = random.randint(20000, 40000)
    if backend == "torch":
        return [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(port),
                "--no-python", sys.executable, *mlxft]
    return [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(ranks), "--starting-port", str(port),
            "--python", sys.executable, "--", *mlxft]


def bench(backend: str, ranks: int, steps: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"{backend}-{ranks}"
    args = [str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--steps", str(steps),
            "--set", "retention.enabled=false", "--set", f"train.eval_every={steps}", "--set",
            f"train.save_every={steps}", *extra]
    env = dict(os.environ, MLXFT_NO_PROGRESS="1")
    if ranks > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    started = time.perf_counter()
    proc = subprocess.run(launch(backend, ranks, args), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    if meta.get("status") != "done":
        sys.exit(f"{backend} x{ranks} failed:\n{proc.stderr[-3000:]}")
    res = meta["results"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r["loss"] for r in rows if r["type"] == "train"][-1]
    return {"backend": backend, "ranks": ranks, "tok_s": res["tok_s"], "tokens": res["tokens"],
            "train_s": res["train_seconds"], "wall_s": wall, "last_loss": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per torch run")
    ap.add_argument("--ranks", type=int, default=2, help="local ranks to compare with one")
    ap.add_argument("--mlx", action="store_true", help="also benchmark the MLX backend under mlx.launch")
    ap.add_argument("--mlx-steps", type=int, default=3)
    ap.add_argument("--model", help="base model (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    extra = ["--model", args.model] if args.model else []
    plans = [("torch", args.steps)] + ([("mlx", args.mlx_steps)] if args.mlx else [])
    results = []
    with tempfile.TemporaryDirectory(prefix="mlxft-bench-dist-") as tmp:
        for backend, steps in plans:
            for ranks in (1, args.ranks):
                results.append(bench(backend, ranks, steps, Path(tmp), extra))
                print(f"done: {backend} x{ranks}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"cores: {os.cpu_count()}, load before the last run: {load:.2f}\n")
    print("| backend | ranks | tokens | train s | tokens/s | wall s | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['ranks']} | {r['tokens']} | {r['train_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['wall_s']:.1f} | {r['last_loss']:.4f} |")
    print()
    for backend, _ in plans:
        one, many = [r for r in results if r["backend"] == backend]
        print(f"{backend}: {args.ranks} ranks / 1 rank tokens/s = {many['tok_s'] / one['tok_s']:.2f}x, "
              f"last-step loss difference {abs(many['last_loss'] - one['last_loss']):.2e}")


if __name__ == "__main__":
    main()
