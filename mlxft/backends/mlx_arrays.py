"""Array and parameter-tree helpers of the MLX step: the mask hook that gives a packed batch its
block-causal mask, flat float32 views of parameter trees for the collectives, shape bucketing,
and copying a tree in place (compiled steps hold on to their containers)."""

from __future__ import annotations

from mlxft.backends.common import split_like


class MaskHook:
    """Stands in for a layer's KV cache during a packed forward: caches nothing, supplies the mask."""

    offset = 0

    def __init__(self, allowed, dtype):
        self.allowed, self.dtype = allowed, dtype

    def make_mask(self, n, return_array=False, window_size=None):
        import mlx.core as mx

        allowed = self.allowed
        if window_size:
            i = mx.arange(n)
            allowed = allowed & ((i[:, None] - i[None, :]) < window_size)
        return mx.where(allowed, mx.array(0, self.dtype), mx.array(mx.finfo(self.dtype).min, self.dtype))

    def update_and_fetch(self, keys, values):
        return keys, values


def packed_allowed(seg):
    """(B, 1, T, T) bool: causal within a sample, blocked across samples; padding sees itself."""
    import mlx.core as mx

    t = seg.shape[1]
    i = mx.arange(t)
    causal = i[:, None] >= i[None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    pad_self = (seg[:, :, None] == 0) & (i[:, None] == i[None, :])
    return ((same & causal) | pad_self)[:, None]


def tree_map_zeros(tree):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(mx.zeros_like, tree)


def flat_f32(arrays):
    import mlx.core as mx

    return mx.concatenate([a.reshape(-1).astype(mx.float32) for a in arrays])


def unflatten_like(flat, leaves):
    """The tree of (name, array) `leaves` rebuilt from `flat`, in their shapes and dtypes."""
    from mlx.utils import tree_unflatten

    parts = split_like(flat, [like for _, like in leaves])
    return tree_unflatten([(name, part.astype(like.dtype)) for (name, like), part in zip(leaves, parts)])


def round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def assign_tree(dst, src):
    """Copy tree `src` into tree `dst` in place (compiled steps hold on to dst's containers)."""
    items = dst.items() if isinstance(dst, dict) else enumerate(dst)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            assign_tree(v, src[k])
        else:
            dst[k] = src[k]
