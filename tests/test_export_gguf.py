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


_GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def weight_errors(gguf_path: Path, model_dir: Path, permute_qk: bool) -> dict[str, float]:
    """Per GGUF tensor: RMS of (gguf-py's dequantization - the source weight in llama.cpp's
    layout) over the source weight's RMS. The expected layout is built here (convert_hf_to_gguf's
    q/k row permutation for llama), not by mlxft's exporter. Unlike logits of a random tiny model,
    where attention is nearly uniform and MLPs are small, this sees every tensor."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    hf = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        got = dequantize(t.data, t.tensor_type).astype(np.float64).reshape([int(x) for x in reversed(t.shape)])
        if t.name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            want = hf[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                       "output.weight": "lm_head.weight"}[t.name]]
        else:
            _, i, short, _ = t.name.split(".")
            want = hf[f"model.layers.{i}.{_GGUF_TO_HF[short]}.weight"]
            if permute_qk and short in ("attn_q", "attn_k"):
                heads = config["num_attention_heads" if short == "attn_q" else "num_key_value_heads"]
                want = want.reshape(heads, 2, want.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(want.shape)
        want = want.astype(np.float64)
        out[t.name] = float(np.sqrt(((got - want) ** 2).mean() / max((want ** 2).mean(), 1e-30)))
    return out


# How far a GGUF type may move the tiny models' logits, in units of close() (the bounds below).
# One rounding with step s of values of RMS sigma leaves a relative RMS error s / (sqrt(12) sigma);
# for the floating types it is u / sqrt(3) with u the unit roundoff. llama.cpp rounds the weights
# (in the file) and the activations (to f16/bf16, or to 8-bit Q8_0/Q8_1 blocks of 32, before each
# matmul), so a matmul's output carries both. The tiny models chain M = 2 layers x 7 matmuls + the
# head = 15 roundings, which add in quadrature; the largest of the (positions x vocab) logit errors
# relative to the largest logit is then about sqrt(M) times the per-matmul error (both maxima sit
# the same number of standard deviations out). Per type, for Gaussian weights (block maximum of
# 32 values ~2.3 sigma):
#   f16  weights + activations u = 2**-11         ->  4.0e-4 per matmul -> sqrt(15)x: 0.0015
#   bf16 u = 2**-8                                 ->  3.2e-3            -> 0.012
#   q8_0 s = 2.3 sigma / 127, + 8-bit activations  ->  7.4e-3            -> 0.029
#   q5_1 s = 4.1 sigma / 31 (max - min)            ->  0.038             -> 0.15
#   q4_0 s = 2.3 sigma / 8                         ->  0.083             -> 0.32
#   q4_k s = 4.1 sigma / 15                        ->  0.079             -> 0.31
# The bounds are these estimates with at most 7x room (f16 also has the f16 KV cache and f16
# attention weights in the sum, 4 more roundings per layer, and gemma3's extra norms, measured
# 0.0028). Measured on an Intel Xeon (Sapphire Rapids): f16 3e-4 to 2.8e-3, bf16 0.0027, q8_0
# 0.0086, q5_1 0.040, q4_0 0.072, q4_k_m 0.14. The roundings themselves are deterministic (round
# to nearest), so these figures move only by float32 summation order across CPUs. A missing q/k
# permutation or a wrong tensor moves close() by 0.5 and more (the adapter below moves it 0.75).


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
    # f16 estimate 0.0015, plus f16 KV cache and attention weights (see the table above close())
    assert close(got, ref) < 0.01, f"{arch}: f16 logits differ from the HF model"
    # No top-1 share: where the lead exceeds twice the bound above it cannot flip, and a random
    # model's near-ties (leads of 1e-3 here) may flip on any CPU without anything being wrong.


@pytest.mark.llamacpp
# tolerances: the table above close(); f32 rounds nothing but the f16 KV cache (u = 2**-11 on K
# and V, 4 roundings per layer: about 2**-11 * sqrt(8) / sqrt(3) = 8e-4)
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
    # every tensor is the source's, rounded by no more than its type's step: per-matmul figures
    # of the table above close() without the activations' share, doubled (blocks whose maximum
    # lies further out); F32 tensors (norms) exactly. A swapped or unpermuted tensor is off by ~1.4.
    per_type = {"f32": 0.0, "bf16": 2 * 2**-8 / np.sqrt(3), "q8_0": 2 * 2.3 / 127 / np.sqrt(12),
                "q5_1": 2 * 4.1 / 31 / np.sqrt(12), "q4_0": 2 * 2.3 / 8 / np.sqrt(12)}
    for name, err in weight_errors(out, model_dir, permute_qk=False).items():
        assert err <= (0.0 if kinds[name] == "F32" else per_type[quant]), (name, kinds[name], err)
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
    # Q4_K (s ~ 4.1 sigma / 15 per sub-block of 32) is the coarsest type q4_k_m uses: relative RMS
    # 0.079 per tensor, doubled as above; F32 tensors exactly.
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, err in weight_errors(out, model_dir, permute_qk=True).items():
        assert err <= (0.0 if kinds[name] == "F32" else 2 * 4.1 / 15 / np.sqrt(12)), (name, kinds[name], err)
    # q4_k estimate 0.31 (table above close()). No top-1 share: with logit errors of 0.3 of the
    # range, a random model's top-1 agreement is a coin toss on every CPU, not a property of mlxft.
    assert close(got, ref) < 0.31


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
    # f32 weights: only llama.cpp's f16 KV cache rounds (8e-4 estimate, see the f32 row above);
    # 0.002 leaves 2.5x. The LoRA side path below adds float32 rounding only.
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
