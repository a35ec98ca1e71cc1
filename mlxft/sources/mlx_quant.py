"""MLX-quantized models (`mlx-community/*-4bit`) for the PyTorch backend.

mlx-lm stores an affine-quantized layer as three tensors: `<name>.weight` (uint32 words holding
`bits`-bit integers, least significant bits first), `<name>.scales` and `<name>.biases` (one per
group of `group_size` inputs); the real weight is `scales * q + biases`, as `mx.dequantize` computes.
config.json says so under "quantization": {"group_size": 64, "bits": 4, <per-layer overrides>}.

`torch_loadable_path(path)` returns `path` unchanged for ordinary models, and otherwise a folder
under MLXFT_HOME/dequantized/ holding the same model with dense weights (in the scales' dtype),
made once and reused. mlx is not needed to read these files (mlxft/mlx_affine.py decodes them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mlxft.atomic import atomic_dir
from mlxft.errors import ModelError
from mlxft.paths import home
from mlxft.mlx_support import SUPPORTED_BITS
from mlxft.sources.capabilities import read_config


def is_mlx_quantized(path: Path) -> bool:
    """True when `path` is an HF-format folder whose config.json carries mlx-lm's quantization."""
    q = read_config(Path(path)).get("quantization")
    return isinstance(q, dict) and "bits" in q


def _layer_params(quant: dict, name: str) -> tuple[int, int, str]:
    """(bits, group_size, mode) for the layer `name` (its weight name without '.weight')."""
    override = quant.get(name)
    if isinstance(override, dict):
        quant = {**quant, **override}
    return int(quant["bits"]), int(quant.get("group_size", 64)), str(quant.get("mode", "affine"))


def dequantize(packed, scales, biases, bits: int, group_size: int):
    """Dense weight (out, in) in the dtype of `scales`, as mx.dequantize(mode='affine') gives
    (computed in float32 by mlxft.mlx_affine, then cast once)."""
    import numpy as np
    import torch

    from mlxft.mlx_affine import dequantize as affine_dequantize

    words = packed.contiguous().view(torch.int32).numpy().view(np.uint32)
    w = affine_dequantize(words, scales.float().numpy(), biases.float().numpy(), bits, group_size)
    return torch.from_numpy(w).to(scales.dtype)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def _cache_key(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in [path / "config.json", *files]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def torch_loadable_path(path: Path) -> Path:
    """`path` itself unless it is MLX-quantized; else a cached folder with dequantized weights."""
    path = Path(path)
    if not is_mlx_quantized(path):
        return path
    files = _weight_files(path)
    if not files:
        raise ModelError(f"{path}: MLX-quantized model without safetensors weights")
    name = path.parent.parent.name.replace("models--", "") if path.parent.name == "snapshots" else path.name
    target = home() / "dequantized" / f"{name}-{_cache_key(path, files)}"
    if (target / "config.json").is_file():
        return target
    from mlxft.ui import console

    with console.status(f"Dequantizing MLX weights of {path.name} for PyTorch (once)"):
        with atomic_dir(target) as tmp:
            _dequantize_folder(path, files, tmp)
    return target


def _dequantize_folder(path: Path, files: list[Path], out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = read_config(path)
    quant = config.pop("quantization")
    config.pop("quantization_config", None)
    weight_map: dict[str, str] = {}
    dtype_name = None
    for f in files:
        tensors = {}
        try:
            with safe_open(str(f), framework="pt") as fh:
                keys = set(fh.keys())
                for key in sorted(keys):
                    if key.endswith((".scales", ".biases")) and key.rsplit(".", 1)[0] + ".weight" in keys:
                        continue
                    base = key[: -len(".weight")] if key.endswith(".weight") else None
                    if base and f"{base}.scales" in keys:
                        bits, group, mode = _layer_params(quant, base)
                        if mode != "affine" or bits not in SUPPORTED_BITS:
                            raise ModelError(f"{path}: {base} uses MLX quantization mode '{mode}' with "
                                             f"{bits} bits; only affine {SUPPORTED_BITS} can be dequantized")
                        biases = fh.get_tensor(f"{base}.biases") if f"{base}.biases" in keys else None
                        if biases is None:
                            raise ModelError(f"{path}: {base} has scales but no biases (not affine)")
                        scales = fh.get_tensor(f"{base}.scales")
                        tensors[key] = dequantize(fh.get_tensor(key), scales, biases, bits, group)
                        dtype_name = dtype_name or str(scales.dtype).replace("torch.", "")
                    else:
                        tensors[key] = fh.get_tensor(key)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{f}: truncated or corrupt safetensors file ({type(exc).__name__})") from None
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in tensors})
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    if dtype_name:
        config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in path.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(extra, out / extra.name)
    (out / "mlxft_source.json").write_text(json.dumps(
        {"kind": "mlx-dequantized", "source": str(path.resolve()), "quantization": quant}, indent=2))
