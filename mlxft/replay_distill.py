"""Replay as distillation (`data.replay_distill: K`): each replay token is trained towards the
base model's whole next-token distribution (its top K tokens, renormalised) instead of the one
token the base happened to say, a KL-to-base term on the replay samples. A sampled answer tells
the adapter one token per position; the distribution tells it how sure the base was and what
else it would have said, which is what retention measures.

The targets are read off the base once, before training, while the adapter is still fresh (the
backend computes the base model), a batch of replay samples per forward pass with the LM head
run at target positions only, and saved to
RUN/replay-teacher.npz so that a resumed run (whose adapter is no longer fresh) trains on the same
ones. Every token of a sample carries a row: target positions the base's top K, the others the
token itself (never trained: their loss mask is 0).

Like the replay answers they are read from, the targets depend only on the base model, so they are
also cached per model under MLXFT_HOME/retention/ (teacher-KEY.npz, keyed by the model's identity
and K, one entry per sample's tokens): a repeat run on the same base computes none.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from mlxft.data import Sample

TEACHER_FILE = "replay-teacher.npz"


TEACHER_BATCH = 16  # replay samples per forward pass, grouped by length


def renormalised(z: np.ndarray) -> np.ndarray:
    """The softmax of each row of the top-k logits `z`: the base model's distribution over its k
    most likely tokens, renormalised to sum to 1."""
    z = z.astype(np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def teacher_targets(backend, sample: Sample, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The soft targets of one sample under the backend's current model (see the module doc)."""
    return teacher_targets_batch(backend, [sample], k)[0]


def teacher_targets_batch(backend, samples: list[Sample], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """teacher_targets of many samples, TEACHER_BATCH of similar length per forward pass, the
    LM head run at target positions only (backend.target_top_k)."""
    from mlxft.data import collate

    out: list = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    pad = backend.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    for start in range(0, len(order), TEACHER_BATCH):
        group = [samples[i] for i in order[start:start + TEACHER_BATCH]]
        top, z = backend.target_top_k(collate(group, pad), k)
        kk = top.shape[1]
        at = 0
        for i, s in zip(order[start:start + TEACHER_BATCH], group):
            n = len(s.ids)
            ids = np.zeros((n, k), dtype=np.int64)
            p = np.zeros((n, k), dtype=np.float32)
            ids[:, 0] = s.ids
            p[:, 0] = 1.0
            where = [j for j in range(1, n) if s.targets[j]]
            if where:
                rows = slice(at, at + len(where))
                ids[where, :kk], p[where, :kk] = top[rows], renormalised(z[rows])
                p[where, kk:] = 0.0
                at += len(where)
            out[i] = (ids, p)
    return out


def attach_teacher(cfg, run, backend, samples: list[Sample], resume: bool) -> None:
    """Give every replay sample its soft targets: read from RUN/replay-teacher.npz when resuming
    (or when it holds these samples), else from the per-model cache, computing only the samples
    it lacks from the fresh adapter; then saved to the run."""
    from mlxft import ui

    k = cfg.data.replay_distill
    if k <= 0 or not samples:
        return
    path = run.path / TEACHER_FILE
    saved = _read(path, samples, k)
    started = time.perf_counter()
    if saved is None:
        cache_path = _cache_path(cfg, run, backend, k)
        cache = _read_cache(cache_path)
        keys = [_sample_key(s) for s in samples]
        missing = [(key, s) for key, s in zip(keys, samples) if key not in cache]
        if missing and resume:
            ui.warn(f"{path}: missing or not for these replay samples; replay trains on the base model's tokens")
            return
        if missing:
            for (key, _), soft in zip(missing, teacher_targets_batch(backend, [s for _, s in missing], k)):
                cache[key] = soft
            _write_cache(cache_path, cache)
        saved = [cache[key] for key in keys]
        _save_targets(path, {str(i): soft for i, soft in enumerate(saved)},
                      tokens=np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in samples]))
        how = (f"{len(missing)} computed, {len(samples) - len(missing)} cached" if missing and len(missing) < len(samples)
               else "computed" if missing else "cached")
        ui.info(f"replay: the base model's top {k} tokens at every replay target, for distillation "
                f"({how}, {time.perf_counter() - started:.1f}s) -> {path}")
    for s, soft in zip(samples, saved):
        s.soft = soft


def _sample_key(sample: Sample) -> str:
    """A sample's tokens and which of them are targets: what its soft targets depend on, besides
    the model and K."""
    h = hashlib.sha256(np.asarray(sample.ids, dtype=np.int64).tobytes())
    h.update(np.asarray(sample.targets, dtype=np.bool_).tobytes())
    return h.hexdigest()[:32]


def _cache_path(cfg, run, backend, k: int) -> Path:
    from mlxft.retention import CACHE_VERSION, _cache_dir, _model_identity, _sha

    return _cache_dir() / f"teacher-{_sha({**_model_identity(cfg, run, backend), 'k': k, 'v': CACHE_VERSION})[:24]}.npz"


def _read_cache(path: Path) -> dict:
    """{sample key: (ids, p)} from a per-model cache file; empty when absent or unreadable (a
    broken cache only costs the time to recompute it)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path) as z:
            keys = [name[4:] for name in z.files if name.startswith("ids_")]
            return {key: (z[f"ids_{key}"], z[f"p_{key}"]) for key in keys}
    except (OSError, KeyError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    """The per-model cache, whole; one that cannot be written (read-only MLXFT_HOME, full disk)
    only costs the time to recompute it."""
    try:
        _save_targets(path, {f"_{key}": soft for key, soft in cache.items()})
    except OSError:
        pass


def _save_targets(path: Path, named: dict, **extra) -> None:
    """Soft targets {name: (ids, p)} as arrays ids{name} and p{name} (plus `extra`) in one .npz,
    written under a temporary name and renamed."""
    from mlxft.atomic import atomic_file

    arrays = {f"ids{n}": a for n, (a, _) in named.items()} | {f"p{n}": b for n, (_, b) in named.items()} | extra
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)


def _read(path, samples: list[Sample], k: int):
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            tokens = np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in samples])
            if not np.array_equal(z["tokens"], tokens):
                return None
            out = [(z[f"ids{i}"], z[f"p{i}"]) for i in range(len(samples))]
    except (OSError, KeyError, ValueError):
        return None
    return out if all(a.shape == (len(s.ids), k) for (a, _), s in zip(out, samples)) else None
