"""Shared pieces for the MLX backend tests: configs, small batches, chat data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlxft.config import Config
from mlxft.data import Sample


def config(lora_type: str = "lora", **train) -> Config:
    cfg = Config()
    cfg.train.dtype = "float32"
    cfg.lora.type = lora_type
    cfg.lora.rank = 4
    cfg.lora.alpha = 8.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def samples(lengths=(12, 20, 9, 17), seed: int = 0) -> list[Sample]:
    """Random token samples whose first 4 tokens are prompt (not scored)."""
    rng = np.random.default_rng(seed)
    return [Sample(ids=[int(x) for x in rng.integers(5, 1000, n)], targets=[i > 3 for i in range(n)])
            for n in lengths]


def write_chat(path: Path, n: int = 24) -> Path:
    """A small chat JSONL with a learnable pattern."""
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    lines = []
    for i in range(n):
        c = colours[i % len(colours)]
        lines.append({"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                                   {"role": "assistant", "content": f"Item {i} is {c}. {c} {c}."}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def load_mlx(cfg, path, **kw):
    from mlxft.backends.mlx_backend import MLXBackend

    be = MLXBackend(cfg)
    be.load(path, **kw)
    return be


def load_torch(cfg, path, **kw):
    pytest.importorskip("peft")
    from mlxft.backends.torch_backend import TorchBackend

    be = TorchBackend(cfg, device="cpu")
    be.load(path, **kw)
    return be
