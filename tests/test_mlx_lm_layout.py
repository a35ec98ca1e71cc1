"""Adapters in mlx-lm's layout, checked against mlx-lm itself: an mlxft adapter exported with
`--adapter-format mlx-lm` loads in `mlx_lm.load` with the same logits (LoRA, DoRA, mixed ranks
and scales), and an adapter trained by `mlx_lm.lora` is read back by mlxft (both backends)
with the same logits, converted once, and usable by generate, fuse and train --model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.data import collate
from tests.helpers.mlx import config, samples, write_chat

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

TOKENS = [[1, 17, 305, 42, 9, 77, 8, 600, 3, 12]]


def _mlx_lm_logits(model_dir, adapter_dir):
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    model.eval()
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))[0]


def _mlxft_logits(backend, model_dir, adapter):
    cfg = config()
    if backend == "mlx":
        from mlxft.backends.mlx_backend import MLXBackend

        be = MLXBackend(cfg)
        be.load(Path(model_dir), adapter=adapter, train=False)
        be.model.eval()
        return np.array(be.model(mx.array(TOKENS)).astype(mx.float32))[0]
    from mlxft.backends.torch_backend import TorchBackend

    be = TorchBackend(cfg, device="cpu")
    be.load(Path(model_dir), adapter=adapter, train=False)
    with torch.no_grad():
        return be._causal_lm()(input_ids=torch.tensor(TOKENS)).logits[0].float().numpy()


def _close(a, b, base):
    moved = np.abs(a - base).max()
    assert moved > 1e-2, "the adapter must change the logits for the comparison to mean anything"
    # both sides compute the same adapter in float32 (MLX against PyTorch or mlx-lm): rounding of
    # ~1e-6 relative on logits of order 1; 1e-3 of the adapter's own effect (at least 1e-2) keeps
    # a mis-scaled adapter (alpha/r off, rsLoRA mixed up: effect off by x2 or more) failing
    assert np.abs(a - b).max() < 1e-3 * max(1.0, moved), (np.abs(a - b).max(), moved)


def _cli(*args):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _mlxft_run(tmp_path, model_dir, lora_type, layers=None):
    """A run directory holding an adapter trained for a few steps by the MLX backend."""
    from mlxft.backends.mlx_backend import MLXBackend
    from mlxft.runs import create_run

    cfg = config(lora_type)
    cfg.lora.layers = layers
    be = MLXBackend(cfg)
    be.load(Path(model_dir), train=True)
    batch = collate(samples(), 2)
    for _ in range(3):
        assert be.train_step([batch], 3e-2).finite
    run = create_run(tmp_path / f"run-{lora_type}", model=str(model_dir), model_path=str(model_dir), source="local")
    be.save_adapter(run.last_adapter)
    return run.path


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_exported_adapter_loads_in_mlx_lm_with_same_logits(tiny_model_dir, tmp_path, lora_type):
    run = _mlxft_run(tmp_path, tiny_model_dir, lora_type, layers=1)
    out = tmp_path / "mlx-adapter"
    result = json.loads(_cli("export", str(run), "--adapter-format", "mlx-lm", "-o", str(out), "--json").stdout)
    assert result["fine_tune_type"] == lora_type and result["num_layers"] == 1

    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["fine_tune_type"] == lora_type and meta["num_layers"] == 1
    assert meta["lora_parameters"]["rank"] == 4 and meta["lora_parameters"]["scale"] == 2.0
    from safetensors.numpy import load_file

    weights = load_file(str(out / "adapters.safetensors"))
    assert weights["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert weights["model.layers.1.self_attn.q_proj.lora_b"].shape == (4, 64)
    assert ("model.layers.1.self_attn.q_proj.m" in weights) == (lora_type == "dora")
    assert not any(k.startswith("model.layers.0.") for k in weights)

    ours = _mlxft_logits("mlx", tiny_model_dir, run / "adapter")
    theirs = _mlx_lm_logits(tiny_model_dir, out)
    _close(theirs, ours, _mlx_lm_logits(tiny_model_dir, None))


def test_mixed_ranks_and_scales_export_exactly(tiny_model_dir, tmp_path):
    """mlx-lm has one rank and one scale: another rank is zero-padded, another scale folded into b."""
    from safetensors.numpy import load_file, save_file

    run = _mlxft_run(tmp_path, tiny_model_dir, "lora")
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    module = "model.layers.0.self_attn.v_proj"
    key = f"base_model.model.{module}"
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(tensors[f"{key}.lora_A.weight"][:2])
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(tensors[f"{key}.lora_B.weight"][:, :2])
    cfg["rank_pattern"] = {module: 2}
    cfg["alpha_pattern"] = {module: 10, "model.layers.1.mlp.down_proj": 3}
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    out = tmp_path / "mixed"
    _cli("export", str(run), "--adapter-format", "mlx-lm", "-o", str(out))
    weights = load_file(str(out / "adapters.safetensors"))
    assert weights[f"{module}.lora_a"].shape == (64, 4)
    assert not weights[f"{module}.lora_a"][:, 2:].any()
    _close(_mlx_lm_logits(tiny_model_dir, out), _mlxft_logits("mlx", tiny_model_dir, adapter),
           _mlx_lm_logits(tiny_model_dir, None))


def test_export_mlx_lm_errors(tiny_model_dir, tmp_path):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["export", str(tiny_model_dir), "--adapter-format", "mlx-lm", "-o",
                                      str(tmp_path / "x")])
    assert result.exit_code == 1 and "needs a run directory" in result.output
    result = CliRunner().invoke(cli, ["export", str(tiny_model_dir), "--adapter-format", "mlx-lm", "-o",
                                      str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "writes a folder" in result.output
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def mlx_lm_trained(tmp_path_factory, tiny_model_dir):
    """Adapters trained by `mlx_lm.lora` itself (a few steps) on the tiny model: {type: folder}."""
    work = tmp_path_factory.mktemp("mlx-lm-train")
    data = work / "data"
    data.mkdir()
    write_chat(data / "train.jsonl", 8)
    write_chat(data / "valid.jsonl", 4)
    out = {}
    for kind in ("lora", "dora"):
        adapter = work / f"adapters-{kind}"
        cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model_dir), "--train",
               "--data", str(data), "--fine-tune-type", kind, "--num-layers", "1", "--iters", "4",
               "--batch-size", "2", "--learning-rate", "5e-2", "--val-batches", "1", "--steps-per-eval", "100",
               "--steps-per-report", "2", "--save-every", "100", "--adapter-path", str(adapter), "--seed", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out[kind] = adapter
    return out


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_mlx_lm_trained_adapter_gives_same_logits_in_mlxft(tiny_model_dir, mlx_lm_trained, lora_type, backend):
    from mlxft.sources import resolve_model

    folder = mlx_lm_trained[lora_type]
    resolved = resolve_model(str(folder))
    assert resolved.source == "mlx-lm" and resolved.path.resolve() == Path(tiny_model_dir).resolve()
    source = json.loads((resolved.adapter / "mlxft_source.json").read_text())
    assert source["origin"] == str(folder.resolve()) and source["kind"] == "mlx-lm-adapter"
    peft = json.loads((resolved.adapter / "adapter_config.json").read_text())
    assert peft["use_dora"] == (lora_type == "dora") and peft["layers_to_transform"] == [1]

    theirs = _mlx_lm_logits(tiny_model_dir, folder)
    ours = _mlxft_logits(backend, tiny_model_dir, resolved.adapter)
    _close(ours, theirs, _mlx_lm_logits(tiny_model_dir, None))


def test_mlx_lm_adapter_converted_once_and_used_by_commands(tiny_model_dir, mlx_lm_trained, tmp_path):
    from mlxft.sources import resolve_model

    folder = mlx_lm_trained["lora"]
    first = resolve_model(str(folder)).adapter
    stamp = (first / "adapter_model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(folder)).adapter == first
    assert (first / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    gen = json.loads(_cli("generate", str(folder), "-p", "Hello", "-n", "4", "--backend", "mlx", "--json").stdout)
    assert gen["tokens"] >= 1
    fused = tmp_path / "fused"
    _cli("fuse", str(folder), "-o", str(fused))
    _close(_mlx_lm_logits(fused, None), _mlx_lm_logits(tiny_model_dir, folder), _mlx_lm_logits(tiny_model_dir, None))

    data = write_chat(tmp_path / "train.jsonl")
    scored = json.loads(_cli("eval", str(folder), "--data", str(data), "--backend", "mlx", "--json").stdout)
    assert scored["tuned"]["loss"] != scored["base"]["loss"]
    _cli("export", str(folder), "--adapter-only", "-o", str(tmp_path / "lora.gguf"))
    assert (tmp_path / "lora.gguf").stat().st_size > 0
    run = tmp_path / "continued"
    _cli("train", "--backend", "mlx", "--model", str(folder), "--data", str(data), "--steps", "1", "--out", str(run),
         "--set", "retention.enabled=false", "--set", "train.max_seq_len=64", "--json")
    meta = json.loads((run / "run.json").read_text())
    assert meta["source"] == "mlx-lm" and Path(meta["model_path"]) == Path(tiny_model_dir).resolve()
    # the continued adapter started from the imported one (same module set), so re-export round-trips
    out = tmp_path / "back"
    _cli("export", str(run), "--adapter-format", "mlx-lm", "-o", str(out))
    assert json.loads((out / "adapter_config.json").read_text())["num_layers"] == 1


def test_bad_mlx_lm_adapter_is_one_line_error(tmp_path, tiny_model_dir):
    from mlxft.cli import cli

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "model": str(tiny_model_dir)}))
    (folder / "adapters.safetensors").write_bytes(b"")
    result = CliRunner().invoke(cli, ["generate", str(folder), "-p", "x"])
    assert result.exit_code == 1 and "fine_tune_type 'full'" in result.output
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "model": str(tmp_path / "nope"),
                                                            "lora_parameters": {"rank": 2, "scale": 1.0}}))
    result = CliRunner().invoke(cli, ["generate", str(folder), "-p", "x"])
    assert result.exit_code == 1 and "cannot be found" in result.output
