"""Streaming safetensors: read one tensor at a time as float32 NumPy (bf16 and MLX-quantized
weights included, no torch needed) and write a model tensor by tensor, so peak memory stays near
one tensor whatever the model size.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian data; we parse it ourselves for that reason.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mlxft.errors import ModelError
from mlxft.mlx_affine import dequantize as mlx_dequantize

_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
       "I16": np.int16, "I32": np.int32, "I64": np.int64, "U32": np.uint32, "BOOL": np.bool_}
_ITEMSIZE = {"BF16": 2, **{k: np.dtype(v).itemsize for k, v in _NP.items()}}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, as torch does; returns the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


class SafetensorsFolder:
    """All tensors of a model folder (single file or sharded with an index), read lazily."""

    def __init__(self, folder: Path, files: list[Path] | None = None):
        self.folder = Path(folder)
        if files is None:
            files = sorted(self.folder.glob("*.safetensors"))
            files = [f for f in files if not f.name.startswith(("adapter_", "."))]
        if not files:
            raise ModelError(f"{self.folder}: no .safetensors weights (only safetensors models are supported)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                try:
                    header = json.loads(fh.read(n))
                except ValueError:
                    raise ModelError(f"{file}: not a safetensors file (bad header)") from None
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = (file, info, 8 + n)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][1]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        """The stored array (bf16 as uint16 bit patterns)."""
        file, info, base = self.entries[name]
        start, end = info["data_offsets"]
        dtype = info["dtype"]
        np_dtype = np.uint16 if dtype == "BF16" else _NP.get(dtype)
        if np_dtype is None:
            raise ModelError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        with open(file, "rb") as fh:
            fh.seek(base + start)
            arr = np.fromfile(fh, dtype=np.dtype(np_dtype).newbyteorder("<"), count=(end - start) // np.dtype(np_dtype).itemsize)
        return arr.reshape(info["shape"])

    def f32(self, name: str) -> np.ndarray:
        arr = self.raw(name)
        if self.dtype(name) == "BF16":
            return bf16_to_f32(arr)
        return arr.astype(np.float32, copy=False)


class ModelTensors:
    """A model folder's tensors as float32 by their unquantized names: MLX-quantized weights
    (`X.weight` uint32 + `X.scales` + `X.biases`, config `quantization`) are dequantized."""

    def __init__(self, folder: Path, config: dict):
        self.st = SafetensorsFolder(folder)
        self.quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
        if self.quant is None and isinstance(config.get("quantization_config"), dict):
            method = config["quantization_config"].get("quant_method", "quantized")
            raise ModelError(f"{folder}: {method}-quantized weights cannot be read for fusing or export",
                             "use the unquantized model")
        if self.quant and self.quant.get("mode", "affine") != "affine":
            raise ModelError(f"{folder}: MLX quantization mode {self.quant.get('mode')!r} is not supported")
        skip = {n for n in self.st.names() if n.endswith((".scales", ".biases")) and
                n.rsplit(".", 1)[0] + ".weight" in self.st and self.quant}
        self._names = [n for n in self.st.names() if n not in skip]

    def names(self) -> list[str]:
        return list(self._names)

    def is_quantized(self, name: str) -> bool:
        return bool(self.quant) and name.endswith(".weight") and name[:-7] + ".scales" in self.st

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.st.shape(name)
        if self.is_quantized(name):
            bits = self._qparams(name)[0]
            return (shape[0], shape[1] * 32 // bits)
        return shape

    def source_dtype(self, name: str) -> str:
        if self.is_quantized(name):
            return self.st.dtype(name[:-7] + ".scales")
        return self.st.dtype(name)

    def _qparams(self, name: str) -> tuple[int, int]:
        per_layer = self.quant.get(name[:-7])
        q = per_layer if isinstance(per_layer, dict) else self.quant
        return int(q.get("bits", 4)), int(q.get("group_size", 64))

    def get(self, name: str) -> np.ndarray:
        if self.is_quantized(name):
            bits, group = self._qparams(name)
            base = name[:-7]
            return mlx_dequantize(self.st.raw(name), self.st.f32(base + ".scales"),
                                  self.st.f32(base + ".biases"), bits, group)
        return self.st.f32(name)


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], produce, metadata: dict | None = None) -> None:
    """Write `specs` [(name, dtype, shape)] to `path`, calling produce(name) -> ndarray for each
    tensor in order, so only one tensor is in memory at a time."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in specs:
            arr = np.ascontiguousarray(produce(name))
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if arr.nbytes != expected or tuple(arr.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {arr.shape} {arr.dtype}, planned {shape} {dtype}")
            arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(fh)


def to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored form of a safetensors dtype (BF16 as uint16 bit patterns)."""
    if dtype == "BF16":
        return f32_to_bf16(x)
    return x.astype(_NP[dtype], copy=False)
