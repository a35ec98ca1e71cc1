"""Gemma 3 on MLX with the embedding scale transformers and llama.cpp use.

mlx-lm 0.32's gemma3_text multiplies the token embeddings by sqrt(hidden_size) rounded to
bfloat16 (25.25 instead of 25.298 for Gemma 3 270M's 640: 0.19% off). transformers rounds that
factor to the weights' dtype (so the two agree for a bfloat16 model) and llama.cpp uses it
unrounded. In float32 the bfloat16 factor moved Gemma 3 270M's logits by 3.4e-3 of their range
away from transformers'; the model trained on MLX would not be the one exported to GGUF.

`use_weight_dtype_embed_scale` gives the loaded model's inner Gemma3Model a subclass whose
__call__ hands mlx-lm pre-multiplied embeddings (its `input_embeddings` argument), so that after
mlx-lm's own bfloat16 factor the product is sqrt(hidden_size) in the weights' dtype. Parameters,
their names and everything else stay mlx-lm's.
"""

from __future__ import annotations


def use_weight_dtype_embed_scale(model) -> bool:
    """Apply the correction to a loaded mlx-lm gemma3_text model (after its dtype is set).
    Returns whether anything changed (nothing for bfloat16 weights or other architectures)."""
    import mlx.core as mx

    inner = getattr(model, "model", None)
    if getattr(model, "model_type", None) != "gemma3_text" or inner is None:
        return False
    dtype = inner.embed_tokens.weight.dtype
    if not mx.issubdtype(dtype, mx.floating):  # a quantized embedding: scales' dtype
        dtype = inner.embed_tokens.scales.dtype
    root = inner.args.hidden_size ** 0.5
    ratio = mx.array(root, dtype).astype(mx.float32).item() / mx.array(root, mx.bfloat16).astype(mx.float32).item()
    if ratio == 1.0:
        return False
    base = type(inner)

    class WeightDtypeEmbedScale(base):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            if input_embeddings is None:
                input_embeddings = self.embed_tokens(inputs)
            return base.__call__(self, inputs, cache, input_embeddings * ratio)

    inner.__class__ = WeightDtypeEmbedScale
    return True
