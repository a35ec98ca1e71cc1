"""GGUF export judged by llama.cpp itself (llama-cpp-python) on tiny random models of every
supported architecture: the file loads, llama.cpp tokenizes like the HF tokenizer, f16 logits
match the source model; a run exports with its adapter merged; the adapter-only GGUF applied to
the base GGUF gives the fused GGUF's logits; refusals happen before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import make_tiny_model
from tests.helpers.export import PROMPT, VARIED, hf_logits, llama_cpp_logits, llama_cpp_model, make_adapter, make_run, tokenizer

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
EXTRA = {"gemma3": {"query_pre_attn_scalar": 16},  # llama.cpp scales gemma3 attention by head_dim
         "qwen2": {"tie_word_embeddings": False},  # exercise a separate output tensor
         "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    """arch -> tiny model folder (built on first use)."""
    root = tmp_path_factory.mktemp("tiny-archs")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(root / f"tiny-{arch}", default_model_dir, arch=arch, **EXTRA.get(arch, {}))
        return built[arch]

    return get


def close(a: np.ndarray, b: np.ndarray) -> float:
    """Largest logit difference relative to the logits' range."""
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))


# --- llama.cpp as the judge ------------------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ARCHS)
def test_f16_export_loads_tokenizes_and_matches_logits(arch, tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    from mlxft.export.gguf import export_model

    model_dir = tiny(arch)
    out = tmp_path / f"{arch}.gguf"
    summary = export_model(model_dir, None, out, "f16")
    assert out.is_file() and summary["architecture"] == {"mistral": "llama"}.get(arch, arch)
    llm = llama_cpp_model(out)
    tok = tokenizer(model_dir)
    assert llm.tokenize(VARIED.encode(), add_bos=False, special=True) == tok.encode(VARIED, add_special_tokens=False)
    ids = tok.encode(PROMPT, add_special_tokens=True)
    got, ref = llama_cpp_logits(llm, ids), hf_logits(model_dir, ids)
    assert close(got, ref) < 0.01, f"{arch}: f16 logits differ from the HF model"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant,tolerance", [("f32", 0.001), ("bf16", 0.03), ("q8_0", 0.05), ("q5_1", 0.2),
                                             ("q4_0", 0.35)])
def test_in_process_types_load_and_stay_close(quant, tolerance, tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from mlxft.export.gguf import export_model

    model_dir = tiny("qwen3")
    out = tmp_path / f"m-{quant}.gguf"
    export_model(model_dir, None, out, quant)
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == quant.upper()
    ids = tokenizer(model_dir).encode(PROMPT)
    assert close(llama_cpp_logits(llama_cpp_model(out), ids), hf_logits(model_dir, ids)) < tolerance


@pytest.mark.llamacpp
def test_kquant_through_llama_cpp_quantizer(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from mlxft.export.gguf import export_model

    model_dir = make_tiny_model(tmp_path / "wide", tiny("llama"), arch="llama",
                                hidden_size=256, intermediate_size=512, num_attention_heads=4)
    out = tmp_path / "m-q4km.gguf"
    export_model(model_dir, None, out, "q4_k_m")
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert "Q4_K" in {t.tensor_type.name for t in reader.tensors}
    assert not list(tmp_path.glob(".m-q4km*")), "intermediate file left behind"
    ids = tokenizer(model_dir).encode(PROMPT)
    got, ref = llama_cpp_logits(llama_cpp_model(out), ids), hf_logits(model_dir, ids)
    assert close(got, ref) < 0.3 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_run_export_merges_adapter_and_adapter_only_matches_fused(arch, tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    from mlxft.export.gguf import export_adapter, export_model

    base = tiny(arch)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else None
    adapter = make_adapter(base, tmp_path / "adapter", targets=targets)
    ids = tokenizer(base).encode(PROMPT)
    fused_gguf, base_gguf, lora_gguf = tmp_path / "fused.gguf", tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export_model(base, adapter, fused_gguf, "f32")
    export_model(base, None, base_gguf, "f32")
    export_adapter(base, adapter, lora_gguf)

    ref_tuned, ref_base = hf_logits(base, ids, adapter), hf_logits(base, ids)
    fused = llama_cpp_logits(llama_cpp_model(fused_gguf), ids)
    assert close(fused, ref_tuned) < 0.002
    assert close(ref_base, ref_tuned) > 0.05, "the test adapter should change the model"
    with_lora = llama_cpp_logits(llama_cpp_model(base_gguf, lora=lora_gguf), ids)
    assert close(with_lora, fused) < 0.002


@pytest.mark.llamacpp
def test_cli_export_run_with_modelfile(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    from click.testing import CliRunner

    from mlxft.cli import cli

    base = tiny("llama")
    run = make_run(tmp_path / "run", base, make_adapter(base, tmp_path / "ad"), system_prompt="Answer in one word.")
    out = tmp_path / "out" / "tuned.gguf"
    res = CliRunner().invoke(cli, ["export", str(run), "-o", str(out), "--quant", "q8_0", "--modelfile", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["quant"] == "q8_0" and data["adapter_merged"].endswith("adapter-best")
    text = Path(data["modelfile"]).read_text()
    assert text.startswith("FROM ./tuned.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Answer in one word."""' in text
    llm = llama_cpp_model(out)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]


# --- refusals and errors (no llama.cpp needed) -------------------------------------------------


def test_unsupported_architecture_refused_before_writing(tmp_path, tiny):
    from mlxft.errors import MlxftError
    from mlxft.export.gguf import export_model

    model = tmp_path / "weird"
    shutil.copytree(tiny("llama"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlxftError, match="gpt_neox.*cannot be exported"):
        export_model(model, None, tmp_path / "o" / "x.gguf", "f16")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_cli_refuses_unknown_type_and_dora_adapter_only(tmp_path, tiny):
    from click.testing import CliRunner

    from mlxft.cli import cli

    res = CliRunner().invoke(cli, ["export", str(tiny("llama")), "-o", str(tmp_path / "x.gguf"), "--quant", "q3_k_xl"])
    assert res.exit_code == 1 and "unknown type 'q3_k_xl'" in res.output
    assert not (tmp_path / "x.gguf").exists()
    base = tiny("llama")
    run = make_run(tmp_path / "run", base, make_adapter(base, tmp_path / "dora", dora=True))
    res = CliRunner().invoke(cli, ["export", str(run), "-o", str(tmp_path / "a.gguf"), "--adapter-only"])
    assert res.exit_code == 1 and "DoRA adapters cannot be exported alone" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".a.gguf*"))


def test_kquant_without_llama_cpp_says_how_to_get_it(tmp_path, tiny, monkeypatch):
    import sys

    from click.testing import CliRunner

    from mlxft.cli import cli

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    res = CliRunner().invoke(cli, ["export", str(tiny("llama")), "-o", str(tmp_path / "x.gguf"), "--quant", "q4_k_m"])
    assert res.exit_code == 1 and "pip install llama-cpp-python" in res.output
    assert not (tmp_path / "x.gguf").exists()


def test_disk_space_checked_before_writing(tmp_path, tiny, monkeypatch):
    import collections

    from mlxft.errors import MlxftError
    from mlxft.export.gguf import export_model

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(MlxftError, match="not enough disk space"):
        export_model(tiny("llama"), None, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*x.gguf*"))


def test_pre_tokenizer_chosen_by_llama_cpp_hash(tiny):
    from mlxft.export.tokenizer import PRE_BY_HASH, Vocab, chk_hash

    vocab = Vocab(tiny("llama"), 49152, "llama")
    assert PRE_BY_HASH[chk_hash(vocab.tok)] == "smollm" == vocab.pre
    assert vocab.model == "gpt2" and len(vocab.tokens) == 49152 and len(vocab.merges) > 40000
    assert vocab.types[vocab.tokens.index("<|im_end|>")] == 3  # CONTROL
    assert vocab.stop_tokens() == ["<|im_end|>"]
