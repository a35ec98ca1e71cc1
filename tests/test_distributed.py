"""Data-parallel training with two local ranks on loopback: torchrun with gloo, and mlx.launch
with the ring backend on mlx[cpu].

A 2-rank run gives the adapter of a 1-rank run with the same global batch; only rank 0 writes;
killing one rank stops the other with a clear message and leaves the last checkpoint whole, and
the run then resumes to the same adapter as an unbroken 2-rank run; ranks started with different
data or recipes stop before any step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mlxft.distributed import World, backend_for_launcher, bytes_to_dir, dir_to_bytes, launcher_in_env
from mlxft.errors import ConfigError, MlxftError
from mlxft.launch import launcher_command, strip_launch_options
from mlxft.rank_agreement import check_agreement
from tests.helpers.data import ROWS
from tests.helpers.distributed import (BIN, LR, STEPS, adapter, assert_same_training, env, files, max_diff,
                                       mlx_launch, rank_pid, run, single, torchrun, train_args, train_rows)


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_dir) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


# ---------------------------------------------------------------------------- pure parts


def test_launcher_detection_and_backend_choice():
    assert launcher_in_env({}) is None
    assert launcher_in_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}) == "torchrun"
    assert launcher_in_env({"MLX_RANK": "0", "MLX_HOSTFILE": "/tmp/h"}) == "mlx.launch"
    assert backend_for_launcher("torchrun", "auto") == "torch"
    assert backend_for_launcher("mlx.launch", "auto") == "mlx"
    assert backend_for_launcher(None, "mlx") == "mlx"
    with pytest.raises(MlxftError, match="started by torchrun"):
        backend_for_launcher("torchrun", "mlx")


def test_launch_options_are_removed_and_launchers_built():
    argv = ["train", "quickstart", "--nproc", "2", "--hosts=10.0.0.1,10.0.0.2", "--set", "a=1",
            "--hostfile", "h.json"]
    assert strip_launch_options(argv) == ["train", "quickstart", "--set", "a=1"]
    cmd = launcher_command("torch", argv, 2, None, None)
    assert cmd[1:3] == ["--nproc-per-node", "2"] and cmd[-6:] == ["-m", "mlxft", "train", "quickstart", "--set", "a=1"]
    cmd = launcher_command("mlx", argv, 2, "10.0.0.1,10.0.0.2", None)
    assert cmd[cmd.index("--hosts") + 1] == "10.0.0.1,10.0.0.2" and cmd[cmd.index("-n") + 1] == "2"
    assert cmd[cmd.index("--") + 1:] == ["-m", "mlxft", "train", "quickstart", "--set", "a=1"]
    with pytest.raises(ConfigError, match="torchrun on every host"):
        launcher_command("torch", argv, 1, "a,b", None)


def test_dir_bytes_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "checkpoint" / "adapter").mkdir(parents=True)
    (src / "checkpoint" / "adapter" / "w.bin").write_bytes(os.urandom(1000))
    (src / "config.yaml").write_text("seed: 1\n")
    (src / "other.txt").write_text("not sent")
    dest = tmp_path / "dest"
    bytes_to_dir(dir_to_bytes(src, members=["config.yaml", "checkpoint"]), dest)
    assert files(dest) == {"config.yaml", "checkpoint/adapter/w.bin"}
    assert (dest / "checkpoint/adapter/w.bin").read_bytes() == (src / "checkpoint/adapter/w.bin").read_bytes()


class _Gathered(World):
    """A world whose all-gather returns fingerprints as if other ranks had sent them."""

    size = 2

    def __init__(self, others):
        self.others = others

    def all_gather_bytes(self, data):
        return [data, *(json.dumps(o).encode() for o in self.others)]


def test_agreement_names_the_rank_and_what_differs():
    mine = {"mlxft": "0.1", "backend": "torch", "model": "m", "adapter": "a", "data": "d1", "config": "c"}
    check_agreement(_Gathered([dict(mine)]), mine)
    with pytest.raises(ConfigError, match="rank 1 disagrees with rank 0 on the tokenized training"):
        check_agreement(_Gathered([{**mine, "data": "d2"}]), mine)
    with pytest.raises(ConfigError, match="on the recipe"):
        check_agreement(_Gathered([{**mine, "config": "c2"}]), mine)


# ---------------------------------------------------------------------------- two ranks

COLLECTIVES = """
import json, sys
from mlxft.distributed import init_world
w = init_world()
out = {"rank": w.rank, "size": w.size, "launcher": w.launcher,
       "gathered": [b.decode() for b in w.all_gather_bytes(("x" * (3 + 5 * w.rank) + str(w.rank)).encode())],
       "broadcast": w.broadcast_bytes(b"from rank 0" if w.is_root else b"ignored").decode(),
       "sum": w.all_sum([1.5, w.rank, 1e9 + w.rank])}
w.barrier()
open(sys.argv[1] + f"/result-{w.rank}.json", "w").write(json.dumps(out))
"""


@pytest.mark.parametrize("launcher", ["torchrun", "mlx.launch"])
def test_collectives_of_each_world(tmp_path, launcher):
    pytest.importorskip("torch" if launcher == "torchrun" else "mlx.core")
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    port = random.randint(20000, 40000)
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), str(script), str(tmp_path)]
    else:
        cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--starting-port", str(port),
               "--python", sys.executable, str(script), str(tmp_path)]
    r = run(cmd, timeout=120)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert [d["rank"] for d in results] == [0, 1], r.stdout + r.stderr[-2000:]
    for d in results:
        assert d["size"] == 2 and d["launcher"] == launcher
        assert d["gathered"] == ["xxx0", "xxxxxxxx1"]  # unequal lengths come back whole
        assert d["broadcast"] == "from rank 0"
        assert d["sum"] == [3.0, 1.0, 2e9 + 1]  # float64: 2e9 + 1 is exact


@pytest.mark.parametrize("sets", [[], ["train.batch_size=3", "train.grad_accumulation=2", "train.packing=true"],
                                  pytest.param(["train.compile=true"], marks=pytest.mark.slow)],
                         ids=["plain", "uneven-shards-accumulation-packing", "fused-lora-compiled"])
def test_torchrun_two_ranks_equal_one(model, data, tmp_path, sets):
    pytest.importorskip("torch")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run(single(train_args(model, data, one, sets)))
    assert r1.returncode == 0, r1.stderr[-2000:]
    before = files(tmp_path)
    r2 = run(torchrun(train_args(model, data, two, sets)))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 ranks under torchrun" in r2.stderr
    assert_same_training(one, two, LR, STEPS)
    # Only rank 0 wrote: the 2-rank run directory is the 1-rank one plus rank 1's saved state,
    # and nothing else appeared next to it.
    extra = {f for f in files(two)} - {f for f in files(one)}
    assert extra and all(f.startswith("checkpoint/ranks/1/") for f in extra)
    assert files(tmp_path) - before == {f"two/{f}" for f in files(two)}
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_mlx_ring_two_ranks_equal_one(model, data, tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    one, two = tmp_path / "one", tmp_path / "two"
    sets = ["train.batch_size=3", "train.grad_accumulation=2"]
    r1 = run(single([*train_args(model, data, one, sets), "--backend", "mlx"]))
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(mlx_launch(train_args(model, data, two, sets)))
    assert "2 ranks under mlx.launch" in r2.stderr, r2.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["status"] == "done"
    assert_same_training(one, two, LR, STEPS)
    extra = files(two) - files(one)
    assert extra and all(f.startswith("checkpoint/ranks/1/") for f in extra)


def test_ranks_with_different_data_stop_before_any_step(model, data, tmp_path):
    pytest.importorskip("torch")
    other = tmp_path / "train1.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in ROWS[::-1]))
    (tmp_path / "train0.jsonl").write_text(data.read_text())
    out = tmp_path / "run"
    args = " ".join(train_args(model, Path(str(tmp_path / "train") + "$RANK.jsonl"), out))
    port = random.randint(20000, 40000)
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), "--no-python",
           "bash", "-c", f"exec {sys.executable} -m mlxft {args}"]
    r = run(cmd)
    assert r.returncode != 0
    assert "rank 1 disagrees with rank 0 on the tokenized training and validation data" in r.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()


def test_backend_that_does_not_match_the_launcher_is_refused(model, data, tmp_path):
    pytest.importorskip("torch")
    r = run(torchrun([*train_args(model, data, tmp_path / "run"), "--backend", "mlx"]))
    assert r.returncode != 0 and "this process was started by torchrun" in r.stderr


def _kill_rank_then_resume(model, data, tmp_path, launch, steps):
    """Start 2 ranks, SIGKILL rank 1 after some checkpoints, check the survivor's message and the
    checkpoint, resume with 2 ranks and compare with an unbroken 2-rank run."""
    sets = ["train.save_every=3", "train.eval_every=20", "lora.dropout=0.1", "train.log_every=1"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    r = run(launch(train_args(model, data, full, sets, steps)))
    assert json.loads((full / "run.json").read_text())["status"] == "done", r.stderr[-3000:]

    marker = uuid.uuid4().hex
    proc = subprocess.Popen(launch(train_args(model, data, broken, sets, steps)), env=env(marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    pid = None
    while time.time() < deadline:
        pid = pid or rank_pid(marker, 1)
        if pid and (broken / "metrics.jsonl").exists() and len(train_rows(broken)) >= 10:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert "lost contact with another rank during step" in err, err[-3000:]
    assert "is intact" in err
    meta = json.loads((broken / "run.json").read_text())
    assert meta["status"] in ("failed", "running")
    trainer = json.loads((broken / "checkpoint" / "trainer.json").read_text())
    assert 3 <= trainer["state"]["step"] < steps and trainer["world_size"] == 2
    assert (broken / "checkpoint" / "ranks" / "1").is_dir()
    assert not list(broken.glob("*.tmp*")) and not list(broken.glob(".*tmp*"))

    r = run(launch(["train", "--resume", str(broken)]))
    assert json.loads((broken / "run.json").read_text())["status"] == "done", r.stderr[-3000:]
    # Same machine, same processes, state restored bit for bit: every step repeats the same sums
    # (a two-rank all-reduce adds a + b, commutative in floating point), so losses and adapters
    # repeat exactly (expected difference 0; 1e-6 is about one ulp of a ~10-nat loss).
    curve = {x["step"]: x["loss"] for x in train_rows(broken)}
    diverged = [(x["step"], x["loss"], curve.get(x["step"])) for x in train_rows(full)
                if curve.get(x["step"]) is None or abs(curve[x["step"]] - x["loss"]) > 1e-6]
    assert not diverged, (f"checkpoint step {trainer['state']['step']}; first (step, unbroken, resumed) "
                          f"that differ: {diverged[:3]}\n{err[-1500:]}\n{r.stderr[-1500:]}")
    assert max_diff(adapter(full / "adapter"), adapter(broken / "adapter")) < 1e-6


@pytest.mark.slow
def test_torchrun_killed_rank_stops_the_other_and_the_run_resumes(model, data, tmp_path):
    pytest.importorskip("torch")
    _kill_rank_then_resume(model, data, tmp_path, torchrun, steps=200)


@pytest.mark.slow
def test_mlx_ring_killed_rank_stops_the_other_and_the_run_resumes(model, data, tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    _kill_rank_then_resume(model, data, tmp_path, mlx_launch, steps=30)


@pytest.mark.parametrize("backend,launcher", [("torch", "torchrun"), ("mlx", "mlx.launch")])
def test_nproc_starts_the_backends_launcher(model, data, tmp_path, backend, launcher):
    pytest.importorskip("torch" if backend == "torch" else "mlx_lm")
    out = tmp_path / "run"
    r = run(single([*train_args(model, data, out, steps=3), "--nproc", "2", "--backend", backend]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "launching: " in r.stderr and launcher in r.stderr and f"2 ranks under {launcher}" in r.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "done" and meta["world_size"] == 2


@pytest.mark.parametrize("save_every", [50, 1])
def test_ctrl_c_under_torchrun_checkpoints_every_rank_together(model, data, tmp_path, save_every):
    """The terminal's SIGINT reaches every rank (and torchrun, which then sends SIGTERM): the
    ranks agree to stop at the same step, write one checkpoint with both ranks' state, and say
    how to resume under the launcher. With save_every=1 the stop lands on a step that was just
    checkpointed, so every rank must know it saved (a rank that saves again alone waits forever
    in the checkpoint's all-gather)."""
    pytest.importorskip("torch")
    out = tmp_path / "run"
    sets = ["train.log_every=1", f"train.save_every={save_every}"]
    proc = subprocess.Popen(torchrun(train_args(model, data, out, sets, steps=400)),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(train_rows(out)) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted", err[-3000:]
    trainer = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert trainer["state"]["step"] == meta["step"] < 400 and trainer["world_size"] == 2
    assert (out / "checkpoint" / "ranks" / "1" / "optimizer.pt").is_file()
    assert f"Interrupted at step {meta['step']}" in err
    assert f"torchrun --nproc-per-node 2 -m mlxft train --resume {out}" in err
    assert "lost contact" not in err, err[-3000:]
