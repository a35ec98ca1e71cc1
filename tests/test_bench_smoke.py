"""scripts/bench_train.py runs end to end on a tiny model for two steps (mlxft's PyTorch backend and
transformers.Trainer + PEFT, each in its own subprocess) and prints its table. Figures are not
asserted: they are measurements, recorded in docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"


def test_bench_train_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--steps", "2", "--skip", "1",
                           "--batch-size", "2", "--max-seq-len", "64", "--only", "mlxft-torch,trainer",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contender | tokens/s |" in proc.stdout
    assert "mlxft, PyTorch backend / transformers.Trainer + PEFT: tokens/s" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"mlxft-torch", "trainer"}
    for r in results.values():
        assert r["steps"] == 2 and r["tokens"] > 0 and r["peak_rss"] > 0 and 0 <= r["padding"] < 1


def test_profile_step_runs_and_its_shares_cover_the_step(tiny_model_dir):
    """scripts/profile_step.py profiles one step of the tiny model (and times three for the MFU);
    its categories, the overhead included, add up to the whole step (each share is printed
    rounded to 1%, so 7 of them sum to within 7 points of 100)."""
    import re

    script = SCRIPT.parent / "profile_step.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--batch-size", "2",
                           "--warmup", "1", "--steps", "3", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = dict(re.findall(r"^\| ([a-z +]+) \| [\d.]+ \| (\d+)% \|$", proc.stdout, re.M))
    assert set(shares) == {"frozen matmul", "lora matmul", "attention", "lm head + loss", "elementwise",
                           "optimizer", "overhead"}
    assert abs(sum(int(v) for v in shares.values()) - 100) <= 7
    assert int(shares["frozen matmul"]) > 0 and "MFU of the median unprofiled step" in proc.stdout
