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


# One tiny model per family and RoPE type the MLX backend trains, with transformers-5 configs
# whose RoPE settings are not mlx-lm's defaults (a setting lost between the libraries shows).
# initializer_range 0.2 (not 0.02) makes attention peaked enough for RoPE to matter: with 0.02 a
# wrong base moved logits by only ~1.6e-3 of the range.
ROPE_FAMILIES = {
    "llama": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "llama-llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 2e5, "factor": 4.0}}),
    "llama-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0,
                                                 "original_max_position_embeddings": 128}}),
    "llama-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 3e5, "factor": 2.0}}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}),
    "qwen3": ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 3e5}}),
    # hidden 80: sqrt(80) is not a bfloat16 number, so mlx-lm's rounded embedding scale would show
    "gemma3_text": ("gemma3", {"hidden_size": 80, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "rope_parameters": {
                                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}}),
    "phi3": ("phi3", {"partial_rotary_factor": 0.5,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 2e5}}),
    # rotary dims 8 -> 4 factors; short and long differ, so mlx-lm is given the short ones
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": 128, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 4.0, 8.0, 16.0], "partial_rotary_factor": 0.5}}),
}


def make_rope_family(root: Path, tokenizer_dir: Path, name: str) -> Path:
    """The ROPE_FAMILIES model `name`, built under `root`."""
    arch, overrides = ROPE_FAMILIES[name]
    return make_tiny_model(Path(root) / name, tokenizer_dir, arch, initializer_range=0.2, **overrides)
