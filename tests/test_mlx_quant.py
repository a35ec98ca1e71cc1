"""MLX affine-quantized weights dequantized for the torch backend match MLX's own mx.dequantize,
and a 4-bit model made by mlx-lm's converter loads in transformers with MLX's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.hub import tiny_llama_files

pytestmark = pytest.mark.mlx


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_matches_mx_dequantize(bits):
    mx = pytest.importorskip("mlx.core")
    import torch

    from mlxft.sources.mlx_quant import dequantize

    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((8, 128)).astype(np.float32)).astype(mx.float16)
    q, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    expected = np.array(mx.dequantize(q, scales, biases, group_size=32, bits=bits).astype(mx.float32))
    got = dequantize(torch.from_numpy(np.array(q)), torch.from_numpy(np.array(scales.astype(mx.float32))).half(),
                     torch.from_numpy(np.array(biases.astype(mx.float32))).half(), bits, 32)
    assert got.dtype == torch.float16 and got.shape == (8, 128)
    # code * scale + bias rounded to float16 once (here) or after each operation (MLX): at most
    # two f16 roundings of values no larger than |w| + |bias|, i.e. two f16 spacings there
    scale = np.abs(expected).max() + np.abs(np.array(biases.astype(mx.float32))).max()
    np.testing.assert_allclose(got.float().numpy(), expected, rtol=0, atol=2 * float(np.spacing(np.float16(scale))))
    # and the codes are really used: rounding a group of 32 standard normals (range ~4.1) to
    # 2**bits levels leaves a mean |error| of a quarter step, 0.34 at 2 bits; codes read in a wrong
    # order leave the mean |difference| of two unrelated normals, ~1.1
    assert np.abs(expected - np.array(w.astype(mx.float32))).mean() < 0.6


def test_mlx_4bit_model_loads_in_torch(tmp_path):
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import torch
    from mlx_lm import convert, load
    from transformers import AutoModelForCausalLM

    from mlxft.sources.mlx_quant import is_mlx_quantized, torch_loadable_path

    src = tmp_path / "hf"
    src.mkdir()
    for name, data in tiny_llama_files(hidden=64, vocab=64, layers=2).items():
        if "/" not in name and not name.endswith(".bin"):
            (src / name).write_bytes(data)
    qdir = tmp_path / "mlx-4bit"
    convert(str(src), mlx_path=str(qdir), quantize=True, q_bits=4, q_group_size=32)
    assert is_mlx_quantized(qdir) and not is_mlx_quantized(src)
    assert torch_loadable_path(src) == src

    dense = torch_loadable_path(qdir)
    assert dense != qdir and not is_mlx_quantized(dense)
    assert torch_loadable_path(qdir) == dense  # cached
    cfg = json.loads((dense / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg

    # every quantized tensor equals mx.dequantize of the stored triple
    stored = mx.load(str(qdir / "model.safetensors"))
    from safetensors.torch import load_file

    ours = load_file(str(dense / "model.safetensors"))
    quantized = [k[: -len(".scales")] for k in stored if k.endswith(".scales")]
    assert quantized
    for base in quantized:
        ref = mx.dequantize(stored[base + ".weight"], stored[base + ".scales"], stored[base + ".biases"],
                            group_size=32, bits=4)
        # float32 code * scale + bias, with or without a fused multiply-add: at most two roundings
        # of values no larger than |w| + |bias|
        scale = np.abs(np.array(ref)).max() + np.abs(np.array(stored[base + ".biases"].astype(mx.float32))).max()
        np.testing.assert_allclose(ours[base + ".weight"].float().numpy(), np.array(ref.astype(mx.float32)),
                                   rtol=0, atol=2 * float(np.spacing(np.float32(scale))))

    # the dense folder is an ordinary transformers model with the quantized model's outputs: both
    # compute the same (dequantized) weights in float32, so they agree to float32 rounding
    from tests.helpers.logit_stats import f32_bound

    tokens = [[0, 5, 9, 3, 17, 42, 8]]
    with torch.no_grad():
        torch_logits, exact = (AutoModelForCausalLM.from_pretrained(dense, dtype=dtype)(torch.tensor(tokens))
                               .logits[0].double().numpy() for dtype in (torch.float32, torch.float64))
    mlx_model, _ = load(str(qdir))
    mlx_logits = np.array(mlx_model(mx.array(tokens))[0].astype(mx.float32))
    bound = f32_bound(torch_logits, exact, longest_dot=cfg["intermediate_size"])
    assert np.abs(mlx_logits - exact).max() <= bound, (np.abs(mlx_logits - exact).max(), bound)
