"""Batched token generation shared by every caller that generates text: sequences join and leave
a running decode batch at token boundaries (continuous batching), each with its own KV cache,
sampling settings, stop ids and seed.

- base.py: the request and event types, the `Decoder` protocol, `generate_many` (a whole list
  of prompts through one decoder, used by `generate --prompts-file`, retention and replay);
- torch_decoder.py: PyTorch, transformers' DynamicCache, left-padded rows, per-row positions;
- mlx_decoder.py: MLX, mlx-lm's own BatchGenerator and LRUPromptCache;
- prefix_cache.py / sampling.py: the PyTorch side's prompt cache and per-row sampling;
- layout.py / weights.py / packed.py: how a CPU holds the frozen Linear weights for decoding
  (column-major; 16-bit; oneDNN-packed copies for steps of several rows), each as measured.
"""
