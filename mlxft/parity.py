"""Does the MLX backend compute the model the PyTorch backend computes? Next-token logits of both
on the same token ids, in float32, compared against one bound: max |difference| <= 1e-3 of the
logit range (max - min over the reference logits).

Why that bound: both backends run the same float32 arithmetic in a different order, so their
logits differ by rounding, about sqrt(K) * 6e-8 relative for a K-term dot product (K in the
thousands for real models: ~1e-5 of the values' scale, and the scale is at most the range).
1e-3 of the range leaves two orders of magnitude for that rounding, while a wrong RoPE base or
scaling moves logits by a sizeable fraction of the range (SmolLM2 with mlx-lm's default base:
4.0 on a range of 62, 0.064 of it; the tiny test models: 0.5 to 0.7 of it).

Used by `mlxft doctor --check MODEL`, the parity tests and scripts/mlx_parity.py. `translate=False`
loads the MLX side without mlxft's corrections (mlx-lm reading config.json alone, mlx-lm's Gemma 3
embedding scale), to show what they change.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BOUND = 1e-3


@dataclass
class Parity:
    max_diff: float
    logit_range: float
    same_argmax: float      # share of positions whose top token agrees
    positions: int

    @property
    def ratio(self) -> float:
        return self.max_diff / self.logit_range if self.logit_range > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return self.ratio <= BOUND

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "bound": BOUND, "ok": self.ok}


def compare(reference: np.ndarray, other: np.ndarray) -> Parity:
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {other.shape}")
    return Parity(max_diff=float(np.abs(reference - other).max()),
                  logit_range=float(reference.max() - reference.min()),
                  same_argmax=float((reference.argmax(-1) == other.argmax(-1)).mean()),
                  positions=int(reference.shape[0]))


def probe_ids(tokenizer, n: int = 32) -> list[int]:
    """A fixed English text, tokenized by the model's own tokenizer, cut to n tokens (positions
    up to n exercise RoPE at many angles)."""
    text = ("The quick brown fox jumps over the lazy dog. Rotary position embeddings turn each "
            "position into angles, so a wrong base changes every attention score after the first "
            "token. Paris is the capital of France, and 1234 + 5678 = 6912.")
    ids = tokenizer.encode(text, add_special_tokens=False)[:n]
    return ids if len(ids) >= 2 else list(range(1, n + 1))


def _config():
    from mlxft.config import Config

    cfg = Config()
    cfg.train.dtype = "float32"
    return cfg


@contextmanager
def _untranslated():
    """The MLX backend without mlxft's corrections: mlx-lm reading config.json as it stands, and
    mlx-lm's own Gemma 3 embedding scale."""
    import mlxft.backends.mlx_backend as mb
    from mlxft.mlx_lm_config import MlxLmFields

    saved = mb.mlx_lm_fields, mb.use_weight_dtype_embed_scale
    mb.mlx_lm_fields = lambda config: MlxLmFields({}, {})
    mb.use_weight_dtype_embed_scale = lambda model: False
    try:
        yield
    finally:
        mb.mlx_lm_fields, mb.use_weight_dtype_embed_scale = saved


def torch_logits(model_path: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    from mlxft.backends.torch_backend import TorchBackend

    be = TorchBackend(_config(), device="cpu")
    be.load(Path(model_path), adapter=adapter, train=False)
    return be.logits(ids)


def mlx_logits(model_path: Path, ids: list[int], translate: bool = True, adapter: Path | None = None) -> np.ndarray:
    from mlxft.backends.mlx_backend import MLXBackend

    be = MLXBackend(_config())
    if translate:
        be.load(Path(model_path), adapter=adapter, train=False)
    else:
        with _untranslated():
            be.load(Path(model_path), adapter=adapter, train=False)
    return be.logits(ids)


def check_model(model_path: Path, n_tokens: int = 32, before: bool = False, adapter: Path | None = None) -> dict:
    """The comparison for one model folder (and adapter): {"tokens", "after": Parity, "before"}.
    `before` also loads MLX without the corrections (an error there is reported, not raised)."""
    from mlxft.tokenizer import load_tokenizer

    ids = probe_ids(load_tokenizer(Path(model_path), False), n_tokens)
    reference = torch_logits(model_path, ids, adapter)
    result = {"tokens": len(ids), "after": compare(reference, mlx_logits(model_path, ids, adapter=adapter))}
    if before:
        try:
            result["before"] = compare(reference, mlx_logits(model_path, ids, translate=False, adapter=adapter))
        except Exception as exc:  # mlx-lm may not even build the untranslated model (gemma3 layer pattern)
            result["before"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return result
