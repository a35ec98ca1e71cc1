"""transformers config.json -> the fields mlx-lm's model classes read, per family.

transformers 5 writes RoPE settings nested: `"rope_parameters": {"rope_type": ..., "rope_theta":
...}` (Gemma 3: one such dict per layer type). mlx-lm 0.32's model classes read top-level
`rope_theta` / `rope_scaling` (Gemma 3: `rope_local_base_freq`, `sliding_window_pattern`; Phi-3:
`partial_rotary_factor`, `original_max_position_embeddings`) and fall back to their own defaults,
so a model saved by transformers 5 silently gets the wrong RoPE base on MLX.

`mlx_lm_fields(config)` returns the overrides that make mlx-lm compute the RoPE transformers
computes (its `modeling_rope_utils`), or raises `UnmappableRope` with a one-line reason when
mlx-lm cannot compute it. Each mapping below is exact, not approximate: mlx-lm's `rope_utils`
builds the same inverse frequencies and attention factor from the fields given. One limit is
stated rather than hidden: mlx-lm's longrope uses a single factor set at every length, whereas
transformers switches from `short_factor` to `long_factor` past `original_max_position_embeddings`;
the mapping gives mlx-lm the short factors and reports that length in `exact_up_to`.

Used where the MLX backend loads a folder (in memory: Hub snapshots are read-only), where mlxft
writes a folder both libraries read (`for_shared_folder`: only fields transformers reads back
unchanged), and for the base folder an mlx-lm-layout export names (`translated_config`).
Imports neither mlx nor torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import ModelError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
# transformers' default_theta per config class, for configs that state no RoPE base at all.
_DEFAULT_THETA = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0, "phi3": 10000.0,
                  "gemma3_text": 1_000_000.0}
_GEMMA3_LOCAL_THETA = 10000.0
_REL = 1e-9  # two float64 computations of one attention factor agree far closer than this


class UnmappableRope(ValueError):
    """mlx-lm cannot compute this model's RoPE as transformers does; the message is one line."""


@dataclass
class MlxLmFields:
    overrides: dict                       # top-level config fields for mlx-lm's ModelArgs
    rope_types: dict[str, str]            # layer kind ("all", "full_attention", ...) -> rope type
    exact_up_to: int | None = None        # positions beyond this are computed differently (longrope)
    shared_safe: dict = field(default_factory=dict)  # the subset transformers also reads unchanged


def _rope_type(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def _flat_rope(config: dict) -> dict:
    """The one RoPE dict of a non-nested config, in transformers 5 form (older configs: built
    from top-level rope_theta / rope_scaling, as transformers' standardize_rope_params does)."""
    # transformers takes a top-level rope_scaling, when present, as the whole RoPE dict
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", _DEFAULT_THETA.get(config.get("model_type"), 10000.0)))
    if "partial_rotary_factor" not in params and config.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = config["partial_rotary_factor"]
    kind = _rope_type(params)
    if kind in ("llama3", "yarn", "longrope", "su"):
        if config.get("original_max_position_embeddings") is not None:  # Phi-3 keeps it top-level; it wins
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def _refuse(config: dict, kind: str, why: str) -> UnmappableRope:
    return UnmappableRope(f"RoPE type '{kind}' of model type '{config.get('model_type', '?')}' cannot be "
                          f"computed by mlx-lm as transformers computes it ({why}); try --backend torch")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL * max(abs(a), abs(b), 1.0)


def _scaling(config: dict, params: dict, max_pos: int | None) -> tuple[dict | None, int | None]:
    """(rope_scaling for mlx-lm's initialize_rope, exact_up_to) for one llama-style RoPE dict."""
    kind = _rope_type(params)
    if kind == "default":
        return None, None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(params["factor"])}, None
    if kind == "dynamic":
        # Both keep the base unchanged up to max_position_embeddings and rescale it beyond by the
        # same formula from the same max_position_embeddings.
        return {"rope_type": "dynamic", "factor": float(params["factor"])}, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if params.get(k) is None]
        if missing:
            raise _refuse(config, kind, f"no {missing[0]}")
        return {"rope_type": "llama3", **{k: params[k] for k in keys}}, None
    if kind == "yarn":
        return _yarn(config, params, max_pos), None
    if kind in ("longrope", "su"):
        return _longrope(config, params, max_pos)
    raise _refuse(config, kind, "mlx-lm has no such RoPE for this architecture")


def _yarn(config: dict, params: dict, max_pos: int | None) -> dict:
    orig = params["original_max_position_embeddings"]
    factor = params.get("factor") or (max_pos / orig)
    if params.get("truncate", True) is False:
        raise _refuse(config, "yarn", "truncate=false: mlx-lm always rounds the correction range")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    # transformers uses the mscale ratio only when both are set, else get_mscale(factor);
    # mlx-lm always uses the ratio with defaults mscale=1, mscale_all_dim=0, which is get_mscale(factor).
    ours = {"mscale": mscale, "mscale_all_dim": mscale_all} if (mscale and mscale_all) else {}
    theirs = _yarn_mscale(factor, ours.get("mscale", 1)) / _yarn_mscale(factor, ours.get("mscale_all_dim", 0))
    if params.get("attention_factor") is not None and not _close(params["attention_factor"], theirs):
        raise _refuse(config, "yarn", f"attention_factor {params['attention_factor']} is not mlx-lm's {theirs:.6g}")
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig,
            "beta_fast": params.get("beta_fast") or 32, "beta_slow": params.get("beta_slow") or 1, **ours}


def _longrope(config: dict, params: dict, max_pos: int | None) -> tuple[dict, int | None]:
    orig = params["original_max_position_embeddings"]
    short, long = params.get("short_factor"), params.get("long_factor")
    if short is None or long is None:
        raise _refuse(config, "longrope", "no short_factor/long_factor")
    # mlx-lm's SuScaledRoPE scales q and k by sqrt(1 + ln(f)/ln(orig)), f = max_pos / orig (1 if f <= 1).
    ratio = (max_pos or orig) / orig
    mlx_scale = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(orig))
    factor = params.get("factor") or ratio
    hf_scale = params.get("attention_factor")
    if hf_scale is None:
        hf_scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    if not _close(hf_scale, mlx_scale):
        raise _refuse(config, "longrope", f"attention factor {hf_scale:.6g} is not mlx-lm's {mlx_scale:.6g}")
    exact_up_to = None if list(short) == list(long) else orig
    return ({"rope_type": "longrope", "original_max_position_embeddings": orig,
             "short_factor": list(short), "long_factor": list(short)}, exact_up_to)


def _no_partial(config: dict, params: dict) -> None:
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(config, _rope_type(params), "partial_rotary_factor is not read by mlx-lm for this architecture")


def _llama_like(config: dict) -> MlxLmFields:
    params = _flat_rope(config)
    _no_partial(config, params)
    scaling, exact = _scaling(config, params, config.get("max_position_embeddings"))
    out = {"rope_theta": float(params["rope_theta"]), "rope_scaling": scaling}
    return MlxLmFields(out, {"all": _rope_type(params)}, exact,
                       _shared_safe(config, params, out, _rope_type(params), exact))


def _phi3(config: dict) -> MlxLmFields:
    params = _flat_rope(config)
    kind = _rope_type(params)
    max_pos = config.get("max_position_embeddings")
    out = {"rope_theta": float(params["rope_theta"]),
           "partial_rotary_factor": float(params.get("partial_rotary_factor", 1.0))}
    exact = None
    if kind == "default":
        out["rope_scaling"] = None
    elif kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(params["factor"]),
                               "long_factor": None}
    elif kind in ("longrope", "su", "yarn"):  # transformers' Phi-3 reads "su" and "yarn" as longrope
        out["rope_scaling"], exact = _longrope(config, params, max_pos)
        out["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    else:
        raise _refuse(config, kind, "mlx-lm's phi3 computes only default, linear and longrope")
    if out["rope_scaling"]:
        out["rope_scaling"]["type"] = out["rope_scaling"]["rope_type"]  # mlx-lm's phi3 reads "type" only
    return MlxLmFields(out, {"all": kind}, exact, _shared_safe(config, params, out, kind, exact))


def _gemma3(config: dict) -> MlxLmFields:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = {**(params.get("full_attention") or {}), **(config.get("rope_scaling") or {})}
        local = dict(params.get("sliding_attention") or {})
    else:  # pre-5 layout: top-level rope_theta / rope_scaling / rope_local_base_freq
        full = _flat_rope({**config, "rope_parameters": params})
        local = {}
    full.setdefault("rope_theta", config.get("rope_theta", _DEFAULT_THETA["gemma3_text"]))
    local.setdefault("rope_theta", config.get("rope_local_base_freq", _GEMMA3_LOCAL_THETA))
    if _rope_type(local) != "default":
        raise _refuse(config, _rope_type(local), "mlx-lm's gemma3 sliding-window layers take no RoPE scaling")
    for part in (full, local):
        _no_partial(config, part)
    if _rope_type(full) in ("llama3", "yarn", "longrope"):
        full.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    scaling, exact = _scaling(config, full, config.get("max_position_embeddings"))
    out = {"rope_theta": float(full["rope_theta"]), "rope_local_base_freq": float(local["rope_theta"]),
           "rope_scaling": scaling}
    pattern = _sliding_pattern(config)
    if pattern is not None:
        out["sliding_window_pattern"] = pattern
    kinds = {"full_attention": _rope_type(full), "sliding_attention": _rope_type(local)}
    # transformers' Gemma 3 config merges a top-level rope_scaling into full_attention
    return MlxLmFields(out, kinds, exact, _shared_safe(config, full, out, _rope_type(full), exact))


def _sliding_pattern(config: dict) -> int | None:
    """mlx-lm's gemma3 makes layer i global when (i + 1) % pattern == 0; transformers 5 lists
    each layer's type. The pattern that reproduces the list, or a refusal."""
    types = config.get("layer_types")
    if not types:
        return None
    pattern = types.index("full_attention") + 1 if "full_attention" in types else 0
    want = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(types))] \
        if pattern else None
    if list(types) != want:
        raise UnmappableRope(f"layer_types of model type 'gemma3_text' cannot be built by mlx-lm, whose gemma3 "
                             "makes every N-th layer full-attention and the rest sliding; try --backend torch")
    return pattern


def _as_scaling(params: dict) -> dict:
    """A transformers RoPE dict as it stands, without the base (for comparisons)."""
    return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}


def _shared_safe(config: dict, params: dict, out: dict, kind: str, exact: int | None) -> dict:
    """Fields of `out` that transformers reads back to the same model: transformers takes a
    top-level `rope_scaling` as the whole RoPE dict, so it is written only when it equals the
    transformers dict (same keys, same values); `rope_theta` and the others it only falls back on."""
    safe = {k: v for k, v in out.items() if k != "rope_scaling"}
    scaling = out.get("rope_scaling")
    if scaling is None:
        if kind == "default":
            safe["rope_scaling"] = None
        return safe
    if exact is not None or None in scaling.values():
        # the short-factor stand-in would change what transformers computes past `exact`; a None
        # (phi3 linear's long_factor, a key mlx-lm requires) is no value transformers accepts
        return safe
    same = dict(scaling)
    theirs = _as_scaling(params)
    if all(theirs.get(k) == v or k in ("type", "rope_type") for k, v in same.items()) and \
            all(k in same for k in theirs if k not in ("type", "rope_type", "attention_factor", "truncate")):
        safe["rope_scaling"] = {**theirs, **same}
    return safe


def mlx_lm_fields(config: dict) -> MlxLmFields:
    """The mlx-lm overrides for this config.json (model_type after mlx-lm's remapping is the
    caller's business: mistral is read by mlx-lm's llama). Raises UnmappableRope."""
    model_type = config.get("model_type")
    if model_type in LLAMA_LIKE:
        return _llama_like(config)
    if model_type == "phi3":
        return _phi3(config)
    if model_type == "gemma3_text":
        return _gemma3(config)
    return MlxLmFields({}, {})


def translated_config(config: dict) -> dict:
    """config.json for a folder only mlx-lm reads (an mlx-lm export's base)."""
    return {**config, **mlx_lm_fields(config).overrides}


def for_shared_folder(config: dict) -> dict:
    """config.json for a folder both transformers and mlx-lm read: adds the fields mlx-lm needs
    that transformers reads back unchanged. Unmappable RoPE is left as it is (the MLX backend
    refuses it at load; the PyTorch backend reads it)."""
    try:
        return {**config, **mlx_lm_fields(config).shared_safe}
    except UnmappableRope:
        return dict(config)


def write_shared_config(folder: Path) -> None:
    """Add the mlx-lm fields to `folder`/config.json in place (a folder mlxft is writing)."""
    file = Path(folder) / "config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    file.write_text(json.dumps(for_shared_folder(config), indent=2) + "\n", encoding="utf-8")


def mlx_lm_base(model_path: Path) -> Path:
    """A folder that `mlx_lm.load` reads as the model transformers reads at `model_path`: the
    folder itself when its config.json already says so, else one mlxft owns under
    MLXFT_HOME/mlx-lm-bases holding the translated config.json and links to the other files
    (Hub snapshots are read-only and transformers reads the original config)."""
    from mlxft.atomic import atomic_dir
    from mlxft.paths import home

    model_path = Path(model_path).resolve()
    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    try:
        translated = translated_config(config)
    except UnmappableRope as exc:
        raise ModelError(f"{model_path}: {exc}") from None
    if translated == config:
        return model_path
    text = json.dumps(translated, indent=2) + "\n"
    digest = hashlib.sha256((str(model_path) + "\0" + text).encode()).hexdigest()[:12]
    target = home() / "mlx-lm-bases" / f"{model_path.name}-{digest}"
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        for item in model_path.iterdir():
            if item.is_file() and item.name != "config.json":
                _link_or_copy(item.resolve(), tmp / item.name)
        (tmp / "config.json").write_text(text, encoding="utf-8")
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src)
    except OSError:  # no symlinks here (Windows without the privilege): a copy reads the same
        shutil.copy2(src, dst)
