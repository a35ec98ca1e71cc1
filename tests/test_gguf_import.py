"""GGUF import: a tiny llama GGUF with the real SmolLM2 vocabulary and mixed tensor types
(K-quants included) imports to weights equal to gguf-py's dequantization with llama.cpp's q/k
permutation undone; damaged files and unsupported architectures are one-line errors; imports are
cached by file hash. With llama-cpp-python: the imported SmolLM2 tokenizes exactly as llama.cpp
does on varied text; (slow) llama.cpp running mlxft's imported weights at F32 agrees to float32
rounding, llama.cpp on the Q4_1 file gives the same next-token distribution within what its 8-bit
activation rounding explains, and four injected import bugs fail both checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlxft.errors import ModelError
from tests.helpers.gguf import (_HF_NAMES, INTER, KV_HEADS, LAYER0_TYPES, _permute, expected_weights, smollm2_gguf,
                                write_tiny_gguf)
from tests.helpers.logit_stats import f32_bound


def write_f32_like(original: Path, weights: dict[str, np.ndarray], out: Path) -> Path:
    """`original`'s metadata (hyperparameters, RoPE base, tokenizer) with `weights` (HF names and
    layout, as mlxft imported them) stored as F32 in llama.cpp's layout. llama.cpp then computes
    mlxft's weights in float32, with no weight or activation quantization, while everything it
    reads besides the weights comes from the original file, not from mlxft."""
    import gguf

    reader = gguf.GGUFReader(str(original))
    arch = reader.fields["general.architecture"].contents()
    n_head = reader.fields[f"{arch}.attention.head_count"].contents()
    n_kv = reader.fields[f"{arch}.attention.head_count_kv"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            arr = weights["model.embed_tokens.weight"]
        elif t.name == "output_norm.weight":
            arr = weights["model.norm.weight"]
        elif t.name == "output.weight":
            arr = weights["lm_head.weight"]
        else:
            _, i, short, _ = t.name.split(".")
            arr = weights[f"model.layers.{i}.{_HF_NAMES[short]}.weight"]
            if short in ("attn_q", "attn_k"):
                arr = _permute(arr, n_head if short == "attn_q" else n_kv)
        writer.add_tensor(t.name, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf")


def test_import_dequantizes_every_type_and_undoes_permutation(tiny_gguf):
    from safetensors.numpy import load_file

    from mlxft.sources.gguf import import_gguf

    folder = import_gguf(tiny_gguf)
    assert folder.parent.name == "models" and folder.name.startswith("tiny-mixed-")
    got = load_file(str(folder / "model.safetensors"))
    want = expected_weights(tiny_gguf)
    assert set(want) <= set(got)
    for name, arr in want.items():
        assert got[name].dtype == np.float32
        # d * q + m (or d * q) in float32 here and in gguf-py, in either order: at most two
        # roundings, 2 * 2**-24 = 1.2e-7 relative; rtol=1e-6 is 8 of those, atol covers zeros.
        # A wrong scale, sub-block or bit order is off by whole quantization steps (>1e-3 here).
        np.testing.assert_allclose(got[name], arr, rtol=1e-6, atol=1e-7, err_msg=name)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == KV_HEADS
    assert "quantization_config" not in config
    source = json.loads((folder / "mlxft_source.json").read_text())
    assert {"Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q8_0", "Q4_1"} <= set(source["tensor_types"])
    # tokenizer rebuilt with llama.cpp's smollm split (digits one by one) and the chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    digits = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([d]) for d in digits] == list("12345")
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_import_is_cached_by_file_hash(tiny_gguf, tmp_path, monkeypatch):
    import shutil

    import mlxft.sources.gguf as g

    first = g.import_gguf(tiny_gguf)
    monkeypatch.setattr(g, "_convert_with_transformers", lambda *a, **k: pytest.fail("converted twice"))
    assert g.import_gguf(tiny_gguf) == first
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(tiny_gguf, copy)
    assert g.import_gguf(copy, name="tiny-mixed").name == first.name  # same bytes, same import


def test_truncated_and_corrupt_gguf_are_one_line_errors(tiny_gguf, tmp_path):
    from mlxft.paths import imported_models_dir
    from mlxft.sources import resolve_model

    data = tiny_gguf.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header-cut.gguf": data[:200],
             "not-gguf.gguf": b"PK\x03\x04" + data[4:1000]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ModelError) as err:
            resolve_model(str(tmp_path / name))
        msg = err.value.message
        assert name in msg and "\n" not in msg
        assert "truncated or corrupt" in msg or "not a GGUF file" in msg
        assert not list(imported_models_dir().glob(f"{Path(name).stem}-*"))


def test_unsupported_architecture(tmp_path):
    from mlxft.sources.gguf import import_gguf

    path = write_tiny_gguf(tmp_path / "phi.gguf", arch="phi2")
    with pytest.raises(ModelError, match=r"phi.gguf: GGUF architecture 'phi2' is not supported \(supported: llama"):
        import_gguf(path)


# --- against llama.cpp --------------------------------------------------------------------------

VARIED_TEXT = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "    indented\t\ttabs   and  runs of    spaces\n\n\n",
    "Prices: $3.50, 12,345.678 units; 2024-11-23T10:00Z #42 @home",
    "Café naïve façade São Paulo Zürich Ångström élève",
    "Emoji 🙂🚀👩‍💻 and flags 🇫🇷 — dashes – “quotes” ‘single’ …",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "<|im_start|>user\nWhat's the capital of France?<|im_end|>\n",
    "I'm sure they'll've DONE it'S fine",
    "",
    " leading space",
]


@pytest.fixture(scope="module")
def llama_vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(smollm2_gguf()), vocab_only=True, verbose=False)


@pytest.mark.llamacpp
def test_smollm2_tokenizer_matches_llamacpp(llama_vocab, default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert len(tok) == llama_vocab.n_vocab()
    for text in VARIED_TEXT + ["".join(VARIED_TEXT)]:
        ours = tok.encode(text, add_special_tokens=False)
        theirs = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == theirs, text
        assert tok.decode(ours) == text
    assert tok.chat_template == llama_vocab.metadata.get("tokenizer.chat_template")


@pytest.mark.llamacpp
def test_float32_gguf_logits_equal_llamacpp(tmp_path):
    """With float32 weights llama.cpp does no activation quantization, so the imported model
    (permutation, rope, norms, tied head) must give the same logits to float precision."""
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    from mlxft.sources.gguf import import_gguf

    path = write_tiny_gguf(tmp_path / "tiny-f32.gguf", seed=11, layer0_types=dict.fromkeys(LAYER0_TYPES, "F32"),
                           other_type="F32", embd_type="F32")
    ids = [1, 57, 803, 1500, 33, 34, 216, 2000, 12, 999, 4, 77]
    folder = import_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    exact = _hf_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64), ids)
    ours = _hf_logits(model, ids)
    # GGML_TYPE_F32 = 0 for the KV cache and no flash attention: nothing is rounded below float32
    theirs = _llamacpp_logits(path, ids, type_k=0, type_v=0, flash_attn=False)
    assert np.abs(theirs).max() > 0.1  # not a degenerate all-zero comparison
    bound = f32_bound(ours, exact, longest_dot=INTER)  # the derivation is in f32_bound
    assert np.abs(exact - theirs).max() <= bound, (np.abs(exact - theirs).max(), bound)


# --- the real SmolLM2 through llama.cpp -----------------------------------------------------------
# Two claims, checked separately so that llama.cpp's CPU-specific kernels cannot hide or fake an
# mlxft bug:
#  1. mlxft's import (dequantized weights, q/k permutation undone, RoPE base, norms, tied head) is
#     the model the GGUF describes: llama.cpp, given mlxft's weights as F32 with the original
#     file's metadata and an F32 KV cache, must agree to float32 rounding.
#  2. llama.cpp on the original Q4_1 file computes the same distribution. Its kernels round every
#     activation to 8 bits (Q8_1/Q8_0 blocks of 32) before each matmul, which moves single logits
#     by up to ~2-3 (differently on each instruction set), so this is judged by mean KL and top-1,
#     against a bound derived from that rounding step (simulated here with the same step).

SMOLLM2_LONGEST_DOT = 1536  # the MLP's down projection sums intermediate_size terms


def _smollm2_conversation_ids(tok) -> list[int]:
    """94 tokens: system, user, assistant and user turns, ending in a generation prompt."""
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris. It is known for the Eiffel Tower, "
                                                 "the Louvre museum, and its cafes along the Seine river, which runs "
                                                 "through the city."},
                {"role": "user", "content": "And of Germany? Answer in one sentence."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _llamacpp_logits(path: Path, ids: list[int], **kwargs) -> np.ndarray:
    from mlxft.export.selfcheck import load_llama  # no AMX repacking (crashes on some CPUs)

    llm = load_llama(path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def smollm2_vs_llamacpp(default_model_dir, tmp_path_factory):
    """Everything the two claims compare, computed once: token ids, mlxft's model (float32), its
    float32 rounding error, llama.cpp's logits on mlxft's weights at F32 and on the Q4_1 file, and
    mlxft's logits with llama.cpp's 8-bit activation rounding simulated."""
    pytest.importorskip("llama_cpp")
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.logit_stats import q8_activations

    ids = _smollm2_conversation_ids(AutoTokenizer.from_pretrained(default_model_dir))
    model64 = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float64)
    exact = _hf_logits(model64, ids)
    del model64
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ours = _hf_logits(model, ids)
    with q8_activations(model) as hooked:
        assert hooked == 7 * 30 + 1  # every projection of the 30 layers, and the head
        simulated = _hf_logits(model, ids)
    f32 = write_f32_like(smollm2_gguf(), load_file(str(default_model_dir / "model.safetensors")),
                         tmp_path_factory.mktemp("smollm2-f32") / "smollm2-f32.gguf")
    # GGML_TYPE_F32 = 0 for the KV cache; no flash attention (its CPU path rounds Q to f16)
    llama_f32 = _llamacpp_logits(f32, ids, type_k=0, type_v=0, flash_attn=False)
    f32.unlink()
    llama_q4 = _llamacpp_logits(smollm2_gguf(), ids)
    return dict(ids=ids, model=model, ours=ours, exact=exact, llama_f32=llama_f32, llama_q4=llama_q4,
                simulated=simulated)


def same_f32_model(candidate: np.ndarray, llama_f32: np.ndarray, bound: float) -> bool:
    return float(np.abs(candidate - llama_f32).max()) <= bound


def same_distribution(candidate: np.ndarray, llama_q4: np.ndarray, ours: np.ndarray, simulated: np.ndarray):
    """Claim 2, for `candidate` logits against llama.cpp's Q4_1 logits; returns (ok, figures).

    Mean KL: the simulated rounding (`simulated`, same 8-bit step, blocks of 32, as ggml's Q8_1
    and Q8_0 use) costs KL_sim = mean KL(ours || simulated). llama.cpp's own realisation differs
    from the simulation only in what the simulation leaves out: f16 rounding of K, V and the
    attention weights (step 2**-11 relative, at least 16x finer than 8-bit blocks, so <1/256 of
    the KL, which grows with the noise variance) and, on CPUs whose kernels pick 256-wide Q8_K
    blocks, a block maximum larger by about sqrt(2 ln 256 / 2 ln 32) ~ 1.27 (variance x1.6).
    So KL(ours || llama.cpp) <= 4 KL_sim leaves room for noise twice the simulated amplitude.
    Top-1: where mlxft's top token leads the runner-up by more than twice the largest change of
    that lead the simulated rounding caused anywhere in the sequence, llama.cpp must pick the
    same token (closer calls may flip on any CPU)."""
    from tests.helpers.logit_stats import mean_kl, top1_margin

    kl_sim = mean_kl(ours, simulated)
    kl = mean_kl(candidate, llama_q4)
    top = ours.argmax(-1)
    rows = np.arange(len(top))
    runner_up = np.argsort(ours, -1)[:, -2]
    lead_change = np.abs((simulated[rows, top] - simulated[rows, runner_up]) - top1_margin(ours))
    decided = top1_margin(candidate) > 2 * lead_change.max()
    flipped = int((candidate.argmax(-1) != llama_q4.argmax(-1))[decided].sum())
    figures = dict(kl=kl, kl_bound=4 * kl_sim, decided=int(decided.sum()), flipped=flipped)
    return kl <= 4 * kl_sim and flipped == 0, figures


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_import_equals_llamacpp_at_f32(smollm2_vs_llamacpp):
    r = smollm2_vs_llamacpp
    bound = f32_bound(r["ours"], r["exact"], SMOLLM2_LONGEST_DOT)
    assert np.abs(r["llama_f32"]).max() > 1  # a real comparison, not two all-zero arrays
    # llama.cpp within 4e of the float64 evaluation (see f32_bound); mlxft's own float32 logits
    # are then within 5e of llama.cpp's by the triangle inequality
    assert same_f32_model(r["exact"], r["llama_f32"], bound), (float(np.abs(r["exact"] - r["llama_f32"]).max()), bound)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_q4_1_in_llamacpp_is_the_same_distribution(smollm2_vs_llamacpp):
    r = smollm2_vs_llamacpp
    ok, figures = same_distribution(r["ours"], r["llama_q4"], r["ours"], r["simulated"])
    assert figures["decided"] >= len(r["ids"]) // 2, figures  # the top-1 check covers most positions
    assert ok, figures


def _wrong_rope_base(model):
    import torch

    rope = model.model.rotary_emb
    dim = rope.inv_freq.shape[0] * 2
    rope.inv_freq.copy_(1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))


def _missing_final_norm(model):
    import torch

    model.model.norm = torch.nn.Identity()


def _k_permutation_kept(model):
    import torch

    for layer in model.model.layers:
        k = layer.self_attn.k_proj.weight
        k.copy_(torch.from_numpy(_permute(k.numpy(), model.config.num_key_value_heads)))


def _gate_and_up_swapped(model):
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight, mlp.up_proj.weight = mlp.up_proj.weight, mlp.gate_proj.weight


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("bug", [_wrong_rope_base, _missing_final_norm, _k_permutation_kept, _gate_and_up_swapped])
def test_smollm2_llamacpp_checks_catch_import_bugs(smollm2_vs_llamacpp, bug):
    """Each bug an import could make fails both claims' checks."""
    import copy

    import torch

    r = smollm2_vs_llamacpp
    broken = copy.deepcopy(r["model"])
    with torch.no_grad():
        bug(broken)
    logits = _hf_logits(broken, r["ids"])
    assert not same_f32_model(logits, r["llama_f32"], f32_bound(r["ours"], r["exact"], SMOLLM2_LONGEST_DOT))
    ok, figures = same_distribution(logits, r["llama_q4"], r["ours"], r["simulated"])
    assert not ok, figures
