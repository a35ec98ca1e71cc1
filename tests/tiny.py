"""Builders for tiny random models that load in seconds, with a real tokenizer."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random causal LM of `arch` (llama|qwen2|qwen3|gemma3|phi3|mistral) with the
    tokenizer from `tokenizer_dir`. Weights are float32 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    if arch in ("qwen3", "gemma3"):
        common["head_dim"] = 16
    common.update(overrides)
    config = AutoConfig.for_model(model_type, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_model_from_spec(work: Path, spec: str) -> Path:
    """A tiny llama from a "HIDDENxLAYERS" spec (benchmark scripts' --tiny), with the default
    model's tokenizer."""
    from mlxft.sources.default import default_model_path

    hidden, layers = (int(x) for x in spec.lower().split("x"))
    return make_tiny_model(Path(work) / f"tiny-{hidden}x{layers}", default_model_path(), hidden_size=hidden,
                           intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 16), num_key_value_heads=max(1, hidden // 32))
