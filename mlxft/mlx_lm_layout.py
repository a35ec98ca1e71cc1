"""Adapters in mlx-lm's layout, both ways: a run's PEFT adapter written as a folder that
`mlx_lm.load(model, adapter_path=DIR)` loads, and an `mlx_lm.lora` adapter folder converted
(once, cached) into the PEFT layout that every mlxft command reads.

mlx-lm's layout (tested against the mlx-lm version named in docs/mlx.md):
    adapter_config.json    fine_tune_type ("lora" | "dora"), num_layers (LoRA on the last N of
                           `model.layers`), lora_parameters {rank, scale, dropout, keys}, model
    adapters.safetensors   `<module path>.lora_a` (in, r), `.lora_b` (r, out), DoRA's `.m` (out,)
`keys` are module paths relative to one block (e.g. "self_attn.q_proj"), or full paths for
modules outside the blocks. The output of an adapted layer is W x + scale * (x a) b, so
PEFT's (A, B, alpha) maps to a = A^T, b = B^T, scale = alpha / r (alpha / sqrt(r) for rsLoRA).
mlx-lm has one rank and one scale per adapter: layers with another rank are zero-padded (which
adds nothing) and another scale is folded into their `b`, so the output is the same.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from mlxft.adapters import linear_factors, peft_config
from mlxft.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
SOURCE = "mlxft_source.json"
IMPORT_FORMAT = 1
_BLOCK = re.compile(r"^(?P<blocks>.+\.layers)\.(?P<index>\d+)\.(?P<key>.+)$")


def is_mlx_lm_adapter(path: Path | str) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def _num_hidden_layers(model_path: Path) -> int:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_path}/config.json: unreadable ({exc})") from None
    value = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(value, int) or value <= 0:
        raise ModelError(f"{model_path}/config.json: no num_hidden_layers")
    return value


def write_mlx_lm_adapter(peft_dir: Path, out: Path, model_path: Path, model_ref: str | None = None) -> dict:
    """Write the PEFT adapter at `peft_dir` (for the base at `model_path`) as an mlx-lm adapter
    folder at `out`, atomically. Returns a summary."""
    from safetensors.numpy import save_file

    from mlxft.atomic import atomic_dir

    peft_dir, out = Path(peft_dir), Path(out)
    cfg, groups = linear_factors(peft_dir, "mlx-lm's adapter layout")
    dora = bool(cfg.get("use_dora")) or any("m" in p for p in groups.values())
    if dora and not all("m" in p for p in groups.values()):
        raise ModelError(f"{peft_dir}: a DoRA adapter lacks the magnitude vector of some layers")
    n_layers = _num_hidden_layers(model_path)
    rank = max(p["A"].shape[0] for p in groups.values())
    scale = Counter(round(p["scale"], 9) for p in groups.values()).most_common(1)[0][0]
    keys, first_block = set(), n_layers
    tensors = {}
    for module, parts in sorted(groups.items()):
        match = _BLOCK.match(module)
        if match:
            index = int(match["index"])
            if index >= n_layers:
                raise ModelError(f"{peft_dir}: adapts block {index}, but {model_path} has {n_layers}")
            first_block = min(first_block, index)
            keys.add(match["key"])
        else:
            keys.add(module)
        a, b = parts["A"].T, parts["B"].T * np.float32(parts["scale"] / scale)
        r = a.shape[1]
        if r < rank:  # zero columns of a and rows of b add nothing
            a = np.pad(a, ((0, 0), (0, rank - r)))
            b = np.pad(b, ((0, rank - r), (0, 0)))
        tensors[f"{module}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{module}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
        if dora:
            tensors[f"{module}.m"] = np.ascontiguousarray(parts["m"], dtype=np.float32)
    from mlxft.mlx_lm_config import mlx_lm_base

    base = mlx_lm_base(model_path)  # a folder whose config.json mlx-lm reads as transformers does
    if base != Path(model_path).resolve():
        model_ref = None  # the Hub id would give mlx-lm the untranslated config
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": n_layers - first_block if first_block < n_layers else 0,
        "lora_parameters": {"rank": rank, "scale": float(scale), "dropout": float(cfg.get("lora_dropout", 0.0)),
                            "keys": sorted(keys)},
        "model": model_ref or str(base),
        "exported_by": "mlxft",
        "exported_from": str(peft_dir.resolve()),
    }
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=4))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "mlx"})
    return {"output": str(out), "format": "mlx-lm", "base": config["model"],
            "fine_tune_type": config["fine_tune_type"], "num_layers": config["num_layers"], "rank": rank,
            "scale": float(scale), "layers_adapted": len(groups), "bytes": (out / WEIGHTS).stat().st_size}


def read_mlx_lm_config(path: Path) -> dict:
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: not a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ModelError(f"{file}: fine_tune_type {kind!r} is not an adapter mlxft can use (only lora, dora)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise ModelError(f"{file}: lora_parameters.scale missing; not an mlx-lm adapter config")
    return config


def to_peft(path: Path) -> tuple[dict, dict]:
    """(PEFT adapter_config, {PEFT key: float32 array}) for the mlx-lm adapter folder `path`."""
    from safetensors.numpy import load_file

    path = Path(path)
    config = read_mlx_lm_config(path)
    params = config["lora_parameters"]
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as exc:
        raise ModelError(f"{path / WEIGHTS}: unreadable safetensors ({exc})") from None
    modules: dict[str, dict] = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise ModelError(f"{path / WEIGHTS}: tensor '{name}' is not a LoRA/DoRA weight (not supported)")
        modules.setdefault(module, {})[leaf] = value.astype(np.float32)
    if not modules:
        raise ModelError(f"{path / WEIGHTS}: holds no adapter weights")
    dora = config.get("fine_tune_type") == "dora"
    scale = float(params["scale"])
    tensors, ranks = {}, set()
    for module, parts in sorted(modules.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise ModelError(f"{path / WEIGHTS}: '{module}' lacks lora_a or lora_b")
        a, b = parts["lora_a"], parts["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ModelError(f"{path / WEIGHTS}: '{module}' is not a linear LoRA (lora_a {a.shape}, lora_b {b.shape}); "
                             "only linear layers are supported")
        if dora and "m" not in parts:
            raise ModelError(f"{path / WEIGHTS}: DoRA adapter lacks the magnitude '{module}.m'")
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if dora:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = np.ascontiguousarray(parts["m"])
        ranks.add(a.shape[1])
    if len(ranks) != 1:
        raise ModelError(f"{path / WEIGHTS}: layers have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    peft = peft_config(config.get("model"), {m: rank for m in modules}, {m: scale * rank for m in modules},
                       dropout=float(params.get("dropout", 0.0)), use_dora=dora)
    return peft, tensors


def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update(name.encode())
        with open(path / name, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def imported_adapters_dir() -> Path:
    from mlxft.paths import home

    return home() / "adapters"


def import_mlx_lm_adapter(path: Path | str) -> Path:
    """The PEFT-layout copy of the mlx-lm adapter folder `path`, converted once into
    MLXFT_HOME/adapters/mlx-lm-<sha256[:12]> (keyed by the folder's content); its
    mlxft_source.json records where it came from."""
    path = Path(path)
    try:
        digest = _folder_digest(path)
    except OSError as exc:
        raise ModelError(f"{path}: unreadable adapter folder ({exc})") from None
    target = imported_adapters_dir() / f"mlx-lm-{digest[:12]}"
    source = target / SOURCE
    if source.is_file():
        try:
            if json.loads(source.read_text()).get("format") == IMPORT_FORMAT:
                return target
        except (OSError, ValueError):
            pass
    peft, tensors = to_peft(path)
    record = {"kind": "mlx-lm-adapter", "origin": str(path.resolve()), "sha256": digest,
              "format": IMPORT_FORMAT, "model": peft["base_model_name_or_path"],
              "mlx_lm_config": read_mlx_lm_config(path)}
    from safetensors.numpy import save_file

    from mlxft.adapters import CONFIG as PEFT_CONFIG, WEIGHTS as PEFT_WEIGHTS
    from mlxft.atomic import atomic_dir, write_errors

    with write_errors("imported adapter", target), atomic_dir(target) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft, indent=2))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / SOURCE).write_text(json.dumps(record, indent=2, default=str))
    return target


def base_model_spec(path: Path | str) -> str:
    """The base model an mlx-lm adapter was trained on: its config's `model` (a local folder,
    taken relative to the current directory or else to the adapter folder, or a Hub repo id)."""
    path = Path(path)
    model = read_mlx_lm_config(path).get("model")
    if not isinstance(model, str) or not model:
        raise ModelError(f"{path / CONFIG}: no 'model' naming the base this adapter was trained on")
    candidate = Path(model).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and (path / candidate).exists():
        return str(path / candidate)
    return model
