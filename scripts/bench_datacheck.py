"""Benchmark: wall time of `mlxft data check` on N short chat samples (default 100,000; the target
is under 60 s), with planted exact and near duplicates that it must find.

    python scripts/bench_datacheck.py [--samples 100000] [--model M]

The data is generated (seeded): questions and answers of 8-25 words drawn from a small
vocabulary, 1% exact copies and 1% near copies (one word changed in a long sample). The command
runs in its own process, as a user runs it, with the tokenizer of the built-in model unless
--model is given; the figures (wall and CPU seconds) include start-up, reading, tokenizing and
the duplicate search. On a shared machine, wall time depends on the load, printed alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("bike wheel tire chain brake gear saddle pedal frame fork spoke rim tube pump lock light bell "
         "helmet road trail hill city shop repair price day week month rider race ride fast slow light heavy "
         "steel carbon alloy red blue green black white new old small large cheap costly good best").split()




def make_data(path: Path, n: int, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    rows = []
    n_exact = n_near = n // 100
    for _ in range(n - n_exact - 2 * n_near):
        q = " ".join(rng.choices(WORDS, k=rng.randint(8, 25))) + "?"
        a = " ".join(rng.choices(WORDS, k=rng.randint(8, 25))) + "."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    base = len(rows)
    for _ in range(n_exact):
        rows.append(json.loads(json.dumps(rows[rng.randrange(base)])))
    for _ in range(n_near):
        src = rows[rng.randrange(base)]
        q = src["messages"][0]["content"] + " " + " ".join(rng.choices(WORDS, k=30))
        a = src["messages"][1]["content"]
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        words = q.split()
        words[-1] = "unicycle"
        rows.append({"messages": [{"role": "user", "content": " ".join(words)}, {"role": "assistant", "content": a}]})
    rng.shuffle(rows)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return n_exact, n_near


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--model", help="model whose tokenizer to use (default: the built-in one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        planted_exact, planted_near = make_data(data, args.samples)
        cmd = [sys.executable, "-m", "mlxft", "data", "check", str(data), "--json", "--max-seq-len", "256"]
        if args.model:
            cmd += ["--model", args.model]
        load_before = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MLXFT_NO_PROGRESS": "1"})
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"data check failed:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    print(f"data check on {report['samples']:,} samples: {elapsed:.1f} s wall "
          f"({'under' if elapsed < 60 else 'OVER'} the 60 s target), {cpu:.1f} s CPU (user+sys)")
    print(f"found: {report['exact_duplicates']['count']} exact duplicates (planted {planted_exact}), "
          f"{report['near_duplicates']['count']} near-duplicate pairs (planted {planted_near})")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; 1-minute load average before/after: "
          f"{load_before:.2f}/{os.getloadavg()[0]:.2f} (other processes share the cores: wall time above "
          "CPU time is time spent waiting for a core)")


if __name__ == "__main__":
    main()
