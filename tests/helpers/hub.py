"""A tiny llama as the files a Hub repo holds (config, tokenizer, safetensors)."""

from __future__ import annotations

import json

import numpy as np


def tiny_llama_files(seed: int = 0, hidden: int = 16, vocab: int = 32, layers: int = 1,
                     big: bool = False) -> dict[str, bytes]:
    """A loadable tiny llama: config, a word-level tokenizer and float32 safetensors weights."""
    from safetensors.numpy import save
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = np.random.default_rng(seed)
    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    inter = hidden * 2
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    if big:  # a bigger file, so a cut mid-file leaves a real partial download
        shapes["lm_head.weight"] = (vocab * 64, hidden)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": not big, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": "float32"}
    return {
        "config.json": json.dumps(config).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1}).encode(),
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                             "eos_token": "</s>", "unk_token": "<unk>",
                                             "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}).encode(),
        "model.safetensors": save(tensors),
        "README.md": b"# tiny\n",
        "pytorch_model.bin": b"PICKLE-DO-NOT-FETCH",
        "onnx/model.onnx": b"onnx",
    }
