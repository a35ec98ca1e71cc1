"""Per-architecture tables for GGUF export: HF config -> GGUF keys, HF tensor names -> GGUF
tensor names (gguf-py's `get_tensor_name_map`), and the per-tensor changes llama.cpp expects
(learned from llama.cpp's convert_hf_to_gguf.py and its model loaders).

    family          GGUF arch  tensor changes
    llama/mistral   llama      q/k rows permuted for rotary; Llama 3 rope scaling -> rope_freqs
    qwen2           qwen2      none (q/k/v biases kept, F32)
    qwen3           qwen3      none; q_norm/k_norm
    gemma3 (text)   gemma3     norm weights + 1; no output tensor (tied)
    phi3            phi3       fused qkv and gate_up as stored; longrope factors as tensors
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from mlxft.errors import ModelError


@dataclass(frozen=True)
class Arch:
    gguf: str                       # general.architecture
    permute_qk: bool = False        # llama-style rotary row order
    norm_shift: float = 0.0         # gemma stores (w - 1)
    write_output: bool = True       # gemma: never (llama.cpp's gemma3 reads the tied embedding)


IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")

ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma3_text": Arch("gemma3", norm_shift=1.0, write_output=False),
    "phi3": Arch("phi3"),
}
SUPPORTED = ("llama (Llama 3.x, SmolLM2)", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def arch_for(config: dict, where: str) -> Arch:
    model_type = config.get("model_type", "")
    if model_type == "gemma3" and "text_config" in config:
        raise ModelError(f"{where}: multimodal Gemma 3 (vision tower) is not supported; export a text-only "
                         "Gemma 3 (model_type gemma3_text, e.g. gemma-3-1b)")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ModelError(f"{where}: architecture '{model_type or 'unknown'}' cannot be exported to GGUF",
                         f"supported: {', '.join(SUPPORTED)}")
    if arch.gguf == "gemma3":
        head_dim = config.get("head_dim", 256)
        if config.get("query_pre_attn_scalar", head_dim) != head_dim and config.get("num_hidden_layers") != 62:
            raise ModelError(f"{where}: query_pre_attn_scalar {config['query_pre_attn_scalar']} != head_dim "
                             f"{head_dim}; llama.cpp's gemma3 cannot represent that attention scale")
    return arch


@functools.lru_cache(maxsize=None)
def _name_map(gguf_arch: str):
    """gguf-py's HF -> GGUF tensor name table for one architecture (one block; the block index is
    carried over by gguf_tensor_name)."""
    import gguf

    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    return gguf.get_tensor_name_map(arch, 1)


def gguf_tensor_name(arch: Arch, hf_name: str) -> str | None:
    """GGUF name for an HF tensor name (gguf-py's table for the architecture); None for tensors
    llama.cpp does not take."""
    if IGNORED.search(hf_name):
        return None
    stem, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise ModelError(f"{hf_name}: unexpected tensor (not a weight or bias)")
    if stem == "lm_head" and not arch.write_output:
        return None
    block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    name = _name_map(arch.gguf).get_name(f"model.layers.0.{block.group(2)}" if block else stem)
    if name is not None and block:
        name = name.replace("blk.0.", f"blk.{block.group(1)}.", 1)
    if name is None:
        raise ModelError(f"{hf_name}: tensor not known for GGUF architecture {arch.gguf}")
    return f"{name}.{suffix}"


def hparams(config: dict) -> dict:
    """The few config values every architecture needs, with defaults resolved."""
    n_head = config["num_attention_heads"]
    return {"n_embd": config["hidden_size"], "n_head": n_head,
            "n_head_kv": config.get("num_key_value_heads", n_head),
            "head_dim": config.get("head_dim") or config["hidden_size"] // n_head,
            "n_layer": config["num_hidden_layers"]}


def rope_params(config: dict, kind: str = "full_attention") -> dict:
    """Rope settings for transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if kind in params or "full_attention" in params:
            params = params.get(kind) or params.get("full_attention") or {}
        return {**params, "rope_type": params.get("rope_type") or params.get("type")}
    scaling = dict(config.get("rope_scaling") or {})
    scaling["rope_theta"] = config.get("rope_local_base_freq" if kind == "sliding_attention" else "rope_theta")
    scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type")
    return scaling


def write_hparams(w, arch: Arch, config: dict) -> None:
    """The `{arch}.*` keys llama.cpp's loader reads."""
    hp = hparams(config)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = rope_params(config)
    default_theta = {"gemma3": 1_000_000.0}.get(arch.gguf, 10_000.0)
    w.add_rope_freq_base(float(rope.get("rope_theta") or default_theta))
    if config.get("head_dim") or arch.gguf in ("gemma3", "qwen3"):
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    rope_type = (rope.get("rope_type") or "default").lower()
    if arch.gguf == "phi3":
        rot = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rot * hp["n_embd"]) // hp["n_head"])
        orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or config.get("max_position_embeddings", 4096)
        w.add_rope_scaling_orig_ctx_len(int(orig))
        w.add_sliding_window(int(config.get("sliding_window") or 0))
        if rope.get("long_factor"):
            scale = config["max_position_embeddings"] / orig
            if rope_type not in ("su", "longrope"):
                raise ModelError(f"config.json: phi3 rope type {rope_type!r} is not supported")
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        return
    if arch.gguf == "llama":
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_rope_dimension_count(hp["head_dim"])
    if rope_type == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(_rope_scaling("LINEAR"))
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(_rope_scaling("YARN"))
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise ModelError(f"config.json: rope scaling {rope_type!r} is not supported for GGUF export")
    if arch.gguf == "gemma3":
        local = rope_params(config, "sliding_attention")
        w.add_rope_freq_base_swa(float(local.get("rope_theta") or 10_000.0))
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if config.get("attn_logit_softcapping"):
            raise ModelError("config.json: gemma3 with attn_logit_softcapping is not supported by llama.cpp")
        window = int(config.get("sliding_window") or 0)
        w.add_sliding_window(window)
        types = config.get("layer_types")
        if window and types:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _rope_scaling(name: str):
    import gguf

    return getattr(gguf.RopeScalingType, name)


def extra_tensors(arch: Arch, config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that HF computes at runtime (rope factors)."""
    rope = rope_params(config)
    hp = hparams(config)
    if arch.gguf == "llama" and (rope.get("rope_type") or "").lower() == "llama3":
        base = rope.get("rope_theta", 10000.0)
        dim = hp["head_dim"]
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rope.get("factor", 8.0)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                out.append(1.0)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": np.array(out, dtype=np.float32)}
    if arch.gguf == "phi3" and rope.get("long_factor"):
        return {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    return {}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (halves) -> llama.cpp's interleaved pairs, per head (rows of q or k,
    or of a LoRA B factor)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def transform(arch: Arch, config: dict, hf_name: str, w: np.ndarray) -> np.ndarray:
    """The per-tensor change llama.cpp expects for this architecture."""
    if arch.permute_qk:
        hp = hparams(config)
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = permute_rows(w, hp["n_head"])
        elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = permute_rows(w, hp["n_head_kv"])
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        w = w + np.float32(arch.norm_shift)
    return w
