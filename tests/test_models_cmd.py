"""`mlxft models`: what a config says about a model (causal LM, quantization, backends), GGUF
imports listed beside Hub snapshots, and `mlxft models rm` for both kinds of entry."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxft.cli import cli


@pytest.mark.parametrize("config,causal", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, True),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}, True),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, True),
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, False),
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, False),
    ({"model_type": "qwen2"}, True),
])
def test_causal_lm_detection(config, causal):
    from mlxft.sources.capabilities import is_causal_lm

    assert is_causal_lm(config) is causal


def test_quantization_and_backends():
    from mlxft.sources.capabilities import backend_support, quantization

    mlx4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "quantization": {"group_size": 64, "bits": 4}, "quantization_config": {"group_size": 64, "bits": 4}}
    assert quantization(mlx4) == "mlx-4bit (group 64)"
    bnb = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    assert quantization(bnb) == "bitsandbytes-4bit"
    assert quantization({"model_type": "llama"}) == "none"
    support = backend_support(mlx4)
    assert support["torch"]  # dequantized on load (mlxft.sources.mlx_quant)
    pytest.importorskip("mlx_lm")
    assert support["mlx"] and not backend_support(bnb)["mlx"]
    assert not any(backend_support({"architectures": ["BertForMaskedLM"], "model_type": "bert"}).values())


def test_imported_gguf_listed_and_removed(tmp_path):
    from mlxft.sources.gguf import import_gguf
    from tests.helpers.gguf import write_tiny_gguf

    folder = import_gguf(write_tiny_gguf(tmp_path / "listme.gguf", seed=7,
                                         layer0_types={"attn_q": "Q8_0", "attn_k": "Q8_0"}))
    runner = CliRunner()
    listing = runner.invoke(cli, ["models", "--json"])
    assert listing.exit_code == 0, listing.output
    rows = {r["repo"]: r for r in json.loads(listing.stdout)}
    row = rows[folder.name]
    assert row["source"] == "gguf" and row["origin"].endswith("listme.gguf")
    assert row["architecture"] == "LlamaForCausalLM" and row["backends"]["torch"] and row["size_bytes"] > 0
    table = runner.invoke(cli, ["models"])
    assert folder.name in table.stdout
    gone = runner.invoke(cli, ["models", "rm", folder.name, "--yes"])
    assert gone.exit_code == 0 and not folder.exists()
    missing = runner.invoke(cli, ["models", "rm", "no/such-model", "--yes"])
    assert missing.exit_code == 1 and "not in the Hugging Face cache" in missing.output


def test_mlx_support_is_the_mlx_backends_own_list():
    """`mlx: yes` exactly for the architectures and quantizations the MLX backend trains, not for
    every model type mlx-lm has a module for (gpt2, gemma2, mamba have one; the backend refuses them)."""
    pytest.importorskip("mlx_lm")
    from mlxft.mlx_support import SUPPORTED_TYPES, unsupported_reason
    from mlxft.mlx_support import mlx_lm_models_dir as _mlx_models_dir
    from mlxft.sources.capabilities import backend_support

    for model_type in SUPPORTED_TYPES:
        assert backend_support({"architectures": ["XForCausalLM"], "model_type": model_type})["mlx"], model_type
    for model_type in ("gpt2", "gemma2", "mamba"):
        assert (_mlx_models_dir() / f"{model_type}.py").is_file()  # the old file-exists rule said yes
        config = {"architectures": ["XForCausalLM"], "model_type": model_type}
        assert not backend_support(config)["mlx"] and "not supported" in unsupported_reason(config, {})
    mxfp4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    assert not backend_support(mxfp4)["mlx"]
