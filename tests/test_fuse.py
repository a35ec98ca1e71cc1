"""`mlxft fuse`: the fused folder loads in transformers and gives the PEFT model's logits (LoRA
and DoRA); an MLX-quantized base is dequantized exactly before fusing; --quantize writes MLX's
affine layout, which mlx-lm loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.export import PROMPT, hf_logits, make_adapter, make_run, tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory, default_model_dir):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("fuse") / "tiny-llama", default_model_dir)


@pytest.mark.parametrize("dora", [False, True])
def test_cli_fuse_matches_peft(base, tmp_path, dora):
    from click.testing import CliRunner

    from mlxft.cli import cli

    adapter = make_adapter(base, tmp_path / "ad", dora=dora)
    run = make_run(tmp_path / "run", base, adapter)
    out = tmp_path / "fused"
    res = CliRunner().invoke(cli, ["fuse", str(run), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tensors_merged"] == 14
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file()
    ids = tokenizer(out).encode(PROMPT)
    fused, ref, plain = hf_logits(out, ids), hf_logits(base, ids, adapter), hf_logits(base, ids)
    # W + s B A summed in float32 once, against PEFT's side path: one rounding (2**-24 relative)
    # per fused weight, carried through 2 layers of width 64 to logits of about 1.5: ~1e-6 here.
    # 1e-4 leaves 100x, and sits 500x below what the adapter changes (next line, measured ~0.7).
    assert np.abs(fused - ref).max() < 1e-4
    assert np.abs(plain - ref).max() > 0.05  # the adapter matters
    assert tokenizer(out).chat_template == tokenizer(base).chat_template


def test_fuse_needs_a_run(base, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    res = CliRunner().invoke(cli, ["fuse", str(base), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "nothing to fuse" in res.output and not (tmp_path / "x").exists()


def test_bf16_base_fused_in_float32_and_cast_once(base, tmp_path):
    from safetensors.torch import load_file as load_torch, save_file

    from mlxft.safetensors_io import SafetensorsFolder, bf16_to_f32
    from mlxft.adapters import Adapter
    from mlxft.fuse import fuse_model

    bf = tmp_path / "bf16"
    bf.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (bf / f.name).write_bytes(f.read_bytes())
    import torch

    save_file({k: v.to(torch.bfloat16) for k, v in load_torch(str(base / "model.safetensors")).items()},
              str(bf / "model.safetensors"))
    cfg = json.loads((bf / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (bf / "config.json").write_text(json.dumps(cfg))
    adapter = make_adapter(base, tmp_path / "ad")
    fuse_model(bf, adapter, tmp_path / "out")
    st = SafetensorsFolder(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert st.dtype(name) == "BF16"
    expected = SafetensorsFolder(bf).f32(name) + Adapter(adapter).delta("model.layers.0.self_attn.q_proj")
    # one rounding of the float32 sum: within bf16's half-ulp (2^-8 relative)
    assert np.abs(st.f32(name) - expected).max() <= np.abs(expected).max() * 2**-8
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.mlx
def test_mlx_quantized_base_dequantized_and_requantize_loads_in_mlx_lm(base, tmp_path):
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm import load

    from mlxft.safetensors_io import SafetensorsFolder, mlx_dequantize
    from mlxft.fuse import fuse_model

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for bits in (3, 4, 8):
        q, s, b = mx.quantize(mx.array(w), group_size=64, bits=bits)
        ref = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
        assert np.array_equal(mlx_dequantize(np.array(q), np.array(s), np.array(b), bits, 64), ref)

    # an MLX 4-bit base, as mlx-community publishes them
    qbase = tmp_path / "q4"
    model, _ = load(str(base))
    from mlx_lm.utils import quantize_model, save_model

    model, qcfg = quantize_model(model, json.loads((base / "config.json").read_text()), group_size=64, bits=4)
    qbase.mkdir()
    save_model(qbase, model)
    for f in base.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (qbase / f.name).write_bytes(f.read_bytes())
    (qbase / "config.json").write_text(json.dumps(qcfg))
    adapter = make_adapter(base, tmp_path / "ad")
    fuse_model(qbase, adapter, tmp_path / "deq")
    st = SafetensorsFolder(tmp_path / "deq")
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    assert st.dtype("model.layers.0.mlp.up_proj.weight") in ("F32", "BF16", "F16")

    fuse_model(base, adapter, tmp_path / "requant", quantize_bits=4)
    cfg = json.loads((tmp_path / "requant" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4}
    # Each requantized weight is the fused float32 weight rounded to 16 levels per group of 64:
    # for Gaussian weights the group's range is ~4.8 sigma, the step 0.32 sigma, the relative RMS
    # error 0.32 / sqrt(12) = 0.092; twice that allows groups with wider ranges. A weight fused
    # wrongly, or one that lost its adapter (which moves q_proj by ~0.4 of its RMS), is beyond it.
    fuse_model(base, adapter, tmp_path / "fused-f32")
    want = SafetensorsFolder(tmp_path / "fused-f32")
    stored = mx.load(str(tmp_path / "requant" / "model.safetensors"))
    quantized = [k[: -len(".scales")] for k in stored if k.endswith(".scales")]
    assert "model.layers.0.self_attn.q_proj" in quantized
    for name in quantized:
        got = np.array(mx.dequantize(stored[name + ".weight"], stored[name + ".scales"], stored[name + ".biases"],
                                     group_size=64, bits=4).astype(mx.float32))
        ref_w = want.f32(name + ".weight")
        rel_rms = float(np.sqrt(((got - ref_w) ** 2).mean() / (ref_w ** 2).mean()))
        assert rel_rms < 2 * 0.32 / np.sqrt(12), (name, rel_rms)
    # and mlx-lm computes it: 15 such roundings (2 layers x 7 matmuls + head) in quadrature move
    # the largest logit error to about sqrt(15) * 0.092 = 0.36 of the largest logit
    mlx_model, tok = load(str(tmp_path / "requant"))
    ids = tok.encode(PROMPT)
    logits = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))
    ref = hf_logits(base, ids, adapter)
    assert np.abs(logits - ref).max() < np.sqrt(15) * 0.092 * np.abs(ref).max()
