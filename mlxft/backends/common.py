"""Framework-neutral logic both backends share: which modules get LoRA, eval mode for the length of
a call, cutting a flat collective buffer back into arrays, the seed each rank trains with and the
gradient-clipping threshold. Works on torch modules/tensors and MLX ones alike. (Which token ids
end a generation is mlxft.templates.stop_ids.)"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

from mlxft.errors import ModelError


def resolve_lora_targets(targets: list[str], available: set[str], linear: set[str]) -> list[str] | None:
    """The requested `targets` that name a module of the model (short names in `available`), in
    the order given; None for "all-linear". ModelError, naming the `linear` layers, when none do."""
    if targets == ["all-linear"]:
        return None
    present = [t for t in targets if t in available]
    if not present:
        raise ModelError(f"lora.targets: none of {targets} are modules of this model",
                         f"its linear layers include: {', '.join(sorted(linear))}")
    return present


def adapted_layer_count(wanted: int | None, n_layers: int) -> int:
    """How many blocks (the last ones) get an adapter: lora.layers, or all when unset or larger."""
    return n_layers if wanted is None else min(wanted, n_layers)


def short_name(path: str) -> str:
    """The last component of a dotted module path ("model.layers.0.self_attn.q_proj" -> "q_proj")."""
    return path.rsplit(".", 1)[-1]


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) for the block, back in training mode afterwards if it
    was; torch.nn.Module and mlx.nn.Module both keep `.training`, `.eval()` and `.train()`."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def split_like(flat, likes: Iterable) -> list:
    """Consecutive pieces of the 1-D `flat`, reshaped to the shapes of `likes` in order (torch
    tensors or MLX arrays: each backend casts the pieces back to its own dtypes)."""
    out, offset = [], 0
    for like in likes:
        n = math.prod(like.shape)
        out.append(flat[offset:offset + n].reshape(like.shape))
        offset += n
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed a rank trains with after loading: the run's seed on rank 0 (so a world of one is
    unchanged), shifted per rank elsewhere so each rank draws its own dropout masks."""
    return seed + rank


def max_grad_norm(cfg) -> float:
    """The clipping threshold both backends apply: train.max_grad_norm, or none (inf) when it is 0."""
    return cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
