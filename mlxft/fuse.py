"""Merge a PEFT-layout LoRA/DoRA adapter into its base model, tensor by tensor, in float32.

`FusedTensors` is the merged model seen as a stream of (name, float32 array): export reads it
directly (no fused copy on disk), `fuse_model` writes it out as an HF-format folder. A quantized
(MLX affine) base is dequantized first: merging into quantized weights and re-quantizing can
erase a small adapter. The result is cast once to the output dtype, or re-quantized on request.

    LoRA:  W' = W + s * B @ A,               s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA:  W' = m * V / ||V||_row,   V = W + s * B @ A   (m = lora_magnitude_vector)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mlxft.adapters import Adapter
from mlxft.errors import ModelError
from mlxft.safetensors_io import ModelTensors, to_dtype, write_safetensors
from mlxft.mlx_affine import quantize as mlx_quantize

WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".npz")


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}/config.json: unreadable ({exc})") from None


class FusedTensors:
    """The base model's tensors (float32, dequantized) with the adapter merged in."""

    def __init__(self, base: Path, adapter: Path | None = None):
        self.base = Path(base)
        self.config = read_config(self.base)
        self.tensors = ModelTensors(self.base, self.config)
        self.adapter = Adapter(adapter) if adapter else None
        self.targets: dict[str, str] = {}
        if self.adapter:
            names = set(self.tensors.names())
            for module in self.adapter.modules:
                if module + ".weight" not in names:
                    raise ModelError(f"{adapter}: adapter module {module} has no weight in the base model {self.base}")
                self.targets[module + ".weight"] = module
            for name in self.adapter.replaced:
                if name not in names:
                    raise ModelError(f"{adapter}: adapter tensor {name} is not in the base model {self.base}")

    def names(self) -> list[str]:
        return self.tensors.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(name)

    def source_dtype(self, name: str) -> str:
        return self.tensors.source_dtype(name)

    def get(self, name: str) -> np.ndarray:
        if self.adapter and name in self.adapter.replaced:
            return self.adapter.st.f32(self.adapter.replaced[name])
        w = self.tensors.get(name)
        module = self.targets.get(name)
        if module is None:
            return w
        w = w + self.adapter.delta(module)
        parts = self.adapter.modules[module]
        if "lora_magnitude_vector" in parts:
            m = self.adapter.st.f32(parts["lora_magnitude_vector"]).reshape(-1)
            norm = np.linalg.norm(w, axis=1)
            w = w * (m / norm)[:, None]
        return w.astype(np.float32, copy=False)


def output_dtype(fused: FusedTensors) -> str:
    """The base's own float dtype (config dtype / torch_dtype), float32 when unknown."""
    name = str(fused.config.get("dtype") or fused.config.get("torch_dtype") or "float32")
    return {"bfloat16": "BF16", "float16": "F16"}.get(name, "F32")


def fuse_model(base: Path, adapter: Path | None, out: Path, *, quantize_bits: int | None = None,
               group_size: int = 64, shard_bytes: int = 4 << 30) -> dict:
    """Write the fused model as an HF folder at `out` (atomically). Returns a summary."""
    from mlxft.atomic import atomic_dir
    from mlxft.mlx_lm_config import for_shared_folder

    fused = FusedTensors(base, adapter)
    dtype = output_dtype(fused)
    if quantize_bits is not None and quantize_bits not in (2, 3, 4, 5, 6, 8):
        raise ModelError(f"--quantize: {quantize_bits} bits is not supported (2, 3, 4, 5, 6 or 8)")
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    quantized: set[str] = set()
    for name in fused.names():
        shape = fused.shape(name)
        if quantize_bits and _quantizable(name, shape, group_size):
            quantized.add(name)
            stem = name[:-7]
            specs.append((name, "U32", (shape[0], shape[1] * quantize_bits // 32)))
            specs.append((stem + ".scales", dtype, (shape[0], shape[1] // group_size)))
            specs.append((stem + ".biases", dtype, (shape[0], shape[1] // group_size)))
        else:
            keep = fused.source_dtype(name) if fused.source_dtype(name) not in ("F32", "F16", "BF16") else dtype
            specs.append((name, keep, shape))
    need = sum(int(np.prod(s)) * {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}.get(d, 4) for _, d, s in specs)
    check_disk_space(Path(out).parent, need, what=str(out))

    cache: dict[str, np.ndarray] = {}

    def produce(name: str) -> np.ndarray:
        if name in cache:
            return cache.pop(name)
        if name in quantized:
            wq, scales, biases = mlx_quantize(fused.get(name), quantize_bits, group_size)
            cache[name[:-7] + ".scales"] = to_dtype(scales, dtype)
            cache[name[:-7] + ".biases"] = to_dtype(biases, dtype)
            return wq
        spec_dtype = next(d for n, d, _ in specs if n == name)
        w = fused.get(name)
        return to_dtype(w, spec_dtype) if spec_dtype in ("F32", "F16", "BF16") else fused.tensors.st.raw(name)

    shards = _shard(specs, shard_bytes)
    with atomic_dir(out) as tmp:
        index = {}
        for i, part in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / fname, part, produce)
            index.update({n: fname for n, _, _ in part})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": need}, "weight_map": index}, indent=2))
        for item in Path(base).iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_FILES) and item.name not in (
                    "config.json", "model.safetensors.index.json", "mlxft_source.json"):
                shutil.copy2(item, tmp / item.name)
        config = dict(fused.config)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["dtype"] = {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32")
        config.pop("torch_dtype", None)
        if quantize_bits:
            config["quantization"] = {"group_size": group_size, "bits": quantize_bits}
            config["quantization_config"] = dict(config["quantization"])
        (tmp / "config.json").write_text(json.dumps(for_shared_folder(config), indent=2))
    return {"output": str(out), "base": str(base), "adapter": str(adapter) if adapter else None,
            "dtype": config["dtype"], "quantized_bits": quantize_bits, "bytes": need,
            "tensors_merged": len(fused.targets) + (len(fused.adapter.replaced) if fused.adapter else 0)}


def _quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """What mlx-lm quantizes: Linear and Embedding weights whose rows split into groups."""
    return name.endswith(".weight") and len(shape) == 2 and shape[1] % group_size == 0 and "norm" not in name


def _shard(specs, limit: int) -> list[list]:
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[2])) * 4
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def check_disk_space(folder: Path, need: int, what: str) -> None:
    """One-line error when the output would not fit (with 5% + 64 MiB slack)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.05 + (64 << 20) > free:
        raise ModelError(f"{what}: not enough disk space (needs about {need / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB free in {probe})")
