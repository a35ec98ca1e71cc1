"""Faults beyond the trainer's: corrupted GGUF files, non-finite training, and a disk that fills
during export. Each ends in a one-line error and leaves earlier files intact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxft.errors import MlxftError, ModelError
from tests.helpers.resume import mount_small_tmpfs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, default_model_dir):
    from tests.helpers.gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", n_tokens=600)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=100), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=255)), max_size=6))
def test_corrupted_gguf_never_crashes(tmp_path, gguf_bytes, cut, flips):
    """Truncated at a random point and/or with bytes of its header region overwritten, the
    reader answers with a ModelError naming the file, or (damage in weight bytes) imports."""
    from mlxft.sources.gguf import inspect_gguf

    data = bytearray(gguf_bytes[: max(1, len(gguf_bytes) * cut // 100)] if cut < 100 else gguf_bytes)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / f"bad-{cut}-{len(flips)}.gguf"
    path.write_bytes(bytes(data))
    try:
        info = inspect_gguf(path)
    except ModelError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert info["architecture"]


def _faults_setup(tiny_model_dir, tmp_path):
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.data import load_dataset, split_dataset
    from mlxft.defaults import resolve
    from mlxft.runs import create_run

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line number {i} of the data"}) + "\n" for i in range(12)))
    cfg = build_config(None, ["train.steps=6", "train.batch_size=2", "train.save_every=1", "train.dtype=float32",
                              "retention.enabled=false"], {"data": {"train": str(data)}})
    backend = TorchBackend(cfg)
    backend.load(tiny_model_dir)
    train_set, valid_set = split_dataset(load_dataset(data, backend.tokenizer, 64), 0.2, 0)
    resolve(cfg, len(train_set), backend.hidden_size())
    run = create_run(tmp_path / "run", model="tiny", model_path=str(tiny_model_dir))
    return cfg, backend, train_set, valid_set, run


def _checkpoint_step_and_finite(run) -> tuple[int, bool]:
    import numpy as np
    from safetensors.numpy import load_file

    from mlxft.runs import Run

    ckpt = Run(run.path).checkpoint
    tensors = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    step = json.loads((ckpt / "trainer.json").read_text())["state"]["step"]
    return step, all(np.isfinite(t).all() for t in tensors.values())


def test_nonfinite_loss_stops_with_advice_and_keeps_checkpoint(tiny_model_dir, tmp_path):
    from mlxft.runs import create_run
    from mlxft.trainer import Trainer

    cfg, backend, train_set, valid_set, run = _faults_setup(tiny_model_dir, tmp_path)
    real_loss = backend._loss_sum
    calls = {"n": 0}

    def poisoned(hidden, labels, need_grad, **kwargs):  # the 4th training step's loss is NaN
        calls["n"] += 1
        loss = real_loss(hidden, labels, need_grad, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    backend._loss_sum = poisoned
    with pytest.raises(MlxftError, match=r"step 4: loss or gradients are not finite.*learning_rate"):
        Trainer(cfg, run, backend, train_set, valid_set).train()
    assert _checkpoint_step_and_finite(run) == (3, True)

    cfg.train.skip_nonfinite = True
    calls["n"] = 0
    run2 = create_run(tmp_path / "run2", model="tiny", model_path=str(tiny_model_dir))
    summary = Trainer(cfg, run2, backend, train_set, valid_set).train()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6


def test_nonfinite_learning_rate_applies_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import mlxft.trainer
    from mlxft.trainer import Trainer

    cfg, backend, train_set, valid_set, run = _faults_setup(tiny_model_dir, tmp_path)
    real = mlxft.trainer.learning_rate
    monkeypatch.setattr(mlxft.trainer, "learning_rate",
                        lambda step, *a: float("nan") if step == 4 else real(step, *a))
    with pytest.raises(MlxftError, match=r"step 4: the learning rate is not finite"):
        Trainer(cfg, run, backend, train_set, valid_set).train()
    assert _checkpoint_step_and_finite(run) == (3, True)
    assert backend.trainable_finite()


def test_poisoned_weights_never_reach_a_checkpoint(tiny_model_dir, tmp_path):
    """Whatever makes the weights non-finite without a non-finite loss or gradient (here an
    optimizer that writes NaN at step 4), the checkpoint keeps the last good step."""
    from mlxft.trainer import Trainer

    cfg, backend, train_set, valid_set, run = _faults_setup(tiny_model_dir, tmp_path)
    real_step, calls = backend.optimizer.step, {"n": 0}

    def poisoning_step(*a, **kw):
        calls["n"] += 1
        out = real_step(*a, **kw)
        if calls["n"] == 4:
            next(p for p in backend.model.parameters() if p.requires_grad).data.fill_(float("nan"))
        return out

    backend.optimizer.step = poisoning_step
    with pytest.raises(MlxftError, match=r"step 4: the adapter weights are not finite.*last good: step 3"):
        Trainer(cfg, run, backend, train_set, valid_set).train()
    assert _checkpoint_step_and_finite(run) == (3, True)


def test_lost_peer_reports_before_the_launchers_terminate(tiny_model_dir, tmp_path):
    """A rank that loses its peer names the intact checkpoint, and the SIGTERM that mlx.launch or
    torchrun sends the survivors right after does not kill it before it has printed that: the
    first SIGTERM passes, a second one ends the process."""
    import signal

    from mlxft.distributed import PeerLost
    from mlxft.trainer import Trainer

    cfg, backend, train_set, valid_set, run = _faults_setup(tiny_model_dir, tmp_path)
    real_loss, calls = backend._loss_sum, {"n": 0}

    def dropped(hidden, labels, need_grad, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise PeerLost("lost contact", detail="Connection reset by peer")
        return real_loss(hidden, labels, need_grad, **kwargs)

    backend._loss_sum = dropped
    try:
        with pytest.raises(PeerLost, match=r"during step 4 \(Connection reset by peer\); the last "
                                           r"checkpoint \(step 3\) in .* is intact"):
            Trainer(cfg, run, backend, train_set, valid_set).train()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "a launcher's SIGTERM would kill the rank before its report"
        handler(signal.SIGTERM, None)  # the launcher's terminate: passes, and arms the default
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def fill(folder: Path, leave: int) -> None:
    """Write a ballast file until only about `leave` bytes are free."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_during_export_keeps_previous_file(tiny_model_dir, tmp_path, monkeypatch):
    """On an 80 MiB tmpfs: the free-space check refuses an export that cannot fit, and when the
    disk fills mid-write anyway the error is one line and the previous GGUF is untouched."""
    from click.testing import CliRunner

    import mlxft.fuse
    from mlxft.cli import cli

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not mount_small_tmpfs(mnt, "80m"):
        pytest.skip("tmpfs mount not permitted here")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLXFT_NO_PROGRESS="1")
        out = mnt / "model.gguf"
        export = [sys.executable, "-m", "mlxft", "export", str(tiny_model_dir), "-o", str(out)]
        first = subprocess.run(export + ["--quant", "f16"], env=env, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr[-2000:]
        before = out.read_bytes()
        fill(mnt, 70 << 20)
        res = subprocess.run(export + ["--quant", "f32"], env=env, capture_output=True, text=True)
        assert res.returncode == 1 and "not enough disk space" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert out.read_bytes() == before
        # Past the check (say another program filled the disk meanwhile): ENOSPC mid-write.
        fill(mnt, 4 << 20)
        monkeypatch.setattr(mlxft.fuse, "check_disk_space", lambda *a, **k: None)
        result = CliRunner().invoke(cli, ["export", str(tiny_model_dir), "-o", str(out), "--quant", "f32"])
        assert result.exit_code == 1, result.output
        assert "No space left" in result.output or "cannot write" in result.output, result.output
        assert out.read_bytes() == before
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast", "model.gguf"]  # no temporary left
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_remote_code_in_a_model_folder_does_not_run(tiny_model_dir, tmp_path):
    """A model folder that ships Python (config auto_map) loads with the library's own classes;
    its code runs only with --trust-remote-code, which this test does not pass."""
    import shutil

    model = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                            "from transformers import LlamaForCausalLM as EvilModel\n")
    (model / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                                "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTok"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXFT_NO_PROGRESS="1")
    res = subprocess.run([sys.executable, "-m", "mlxft", "generate", str(model), "--prompt", "hi",
                          "--max-tokens", "2", "--backend", "torch"], env=env, capture_output=True, text=True)
    assert not marker.exists()
    assert res.returncode in (0, 1)
    if res.returncode == 1:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
