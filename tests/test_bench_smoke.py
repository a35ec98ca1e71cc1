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
