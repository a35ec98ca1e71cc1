"""Measured matmul speed of this machine per backend and dtype, for `mlxft doctor --bench` and
the model-FLOPs-utilisation (MFU) estimate in training progress; and a cache for other figures
of this machine (the decode speed per weight dtype of mlxft.decode.weights, and on packed
weights, mlxft.decode.packed).

The shape (512 x 576) @ (576 x 1536) is a small model's MLP projection over a batch of tokens,
closer to what LoRA training runs than a square 1024 product. Each figure is the best of a few
repeats. Results are cached per machine, library version and thread count in
MLXFT_HOME/devicebench.json; `doctor --bench` always measures again and refreshes the cache, and
training measures only the dtype it uses (a fraction of a second) when nothing is cached.
"""

from __future__ import annotations

import json
import platform
import time

SHAPE = (512, 576, 1536)


def _time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _torch_gflops(dtype_name: str, device: str = "cpu", shape=SHAPE) -> float:
    import torch

    m, k, n = shape
    dtype = getattr(torch, dtype_name)
    # A private generator: measuring must not move the global RNG that LoRA dropout draws from,
    # or the first run on a machine (no cached figure) would train differently from later ones.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
    b = torch.randn(k, n, dtype=dtype, device=device, generator=gen)
    if device == "cuda":
        def fn():
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
        return 20 * 2 * m * k * n / _time(fn) / 1e9
    return 2 * m * k * n / _time(lambda: a @ b) / 1e9


def _mlx_gflops(dtype_name: str, shape=SHAPE) -> float:
    import mlx.core as mx

    m, k, n = shape
    dtype = getattr(mx, dtype_name)
    ka, kb = mx.random.split(mx.random.key(0))  # explicit keys leave the global RNG alone
    a, b = mx.random.normal((m, k), key=ka).astype(dtype), mx.random.normal((k, n), key=kb).astype(dtype)
    return 2 * m * k * n / _time(lambda: mx.eval(a @ b)) / 1e9


def _key(backend: str, dtype: str, device: str) -> str:
    threads = ""
    if backend == "torch":
        import torch

        threads = f"{torch.__version__}/{torch.get_num_threads()}t"
    return f"{backend}/{device}/{dtype}/{platform.machine()}/{threads}"


def _cache_file():
    from mlxft.paths import home

    return home() / "devicebench.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict, drop: tuple[str, ...] = ()) -> None:
    """Add `entries` to the cache, first dropping the figures whose key contains one of `drop`
    (they are measured again when next needed)."""
    try:
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {k: v for k, v in _read_cache().items() if not any(d in k for d in drop)}
        cache.update(entries)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only loses the cache


def matmul_gflops(m: int = SHAPE[0], k: int = SHAPE[1], n: int = SHAPE[2]) -> list[dict]:
    """GFLOPS of an (m x k) @ (k x n) product per available backend and dtype. At the default shape
    (`doctor --bench`) it refreshes the cache and drops the decode figures of
    mlxft.decode.weights and mlxft.decode.packed, measured again at the next load."""
    rows, cache = [], {}
    shape = (m, k, n)
    try:
        import torch  # noqa: F401

        for dtype in ("float32", "bfloat16"):
            g = _torch_gflops(dtype, "cpu", shape)
            rows.append({"backend": "torch", "dtype": dtype, "shape": f"{m}x{k}x{n}", "gflops": g})
            cache[_key("torch", dtype, "cpu")] = g
    except ImportError:
        pass
    try:
        import mlx.core  # noqa: F401

        for dtype in ("float32", "bfloat16"):
            g = _mlx_gflops(dtype, shape)
            rows.append({"backend": "mlx", "dtype": dtype, "shape": f"{m}x{k}x{n}", "gflops": g})
            cache[_key("mlx", dtype, "default")] = g
    except ImportError:
        pass
    if shape == SHAPE:
        _write_cache(cache, drop=("/decode-weights/", "/decode-packed/"))
    return rows


def cached_figure(name: str, measure):
    """A figure of this machine (per torch version and thread count) under `name`: cached, else
    `measure()`d and cached."""
    key = _key("torch", name, "cpu")
    cached = _read_cache().get(key)
    if cached is not None:
        return cached
    value = measure()
    _write_cache({key: value})
    return value


def peak_gflops(backend: str, dtype: str, device: str = "cpu") -> float | None:
    """The cached (else freshly measured, then cached) matmul GFLOPS for this backend, dtype and
    device; None when it cannot be measured."""
    try:
        key = _key(backend, dtype, device if backend == "torch" else "default")
    except ImportError:
        return None
    cached = _read_cache().get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        return float(cached)
    try:
        g = _torch_gflops(dtype, device) if backend == "torch" else _mlx_gflops(dtype)
    except Exception:  # noqa: BLE001 - an estimate is optional; never fail training over it
        return None
    _write_cache({key: g})
    return g
