"""Replay as distillation (`data.replay_distill: K`): each replay token is trained towards the
base model's whole next-token distribution (its top K tokens, renormalised) instead of the one
token the base happened to say, a KL-to-base term on the replay samples. A sampled answer tells
the adapter one token per position; the distribution tells it how sure the base was and what
else it would have said, which is what retention measures.

The targets are read off the base once, before training, while the adapter is still fresh (the
backend computes the base model), one forward pass per replay sample, and saved to
RUN/replay-teacher.npz so that a resumed run (whose adapter is no longer fresh) trains on the same
ones. Every token of a sample carries a row: target positions the base's top K, the others the
token itself (never trained: their loss mask is 0).
"""

from __future__ import annotations

import time

import numpy as np

from mlxft.data import Sample

TEACHER_FILE = "replay-teacher.npz"


def top_k_rows(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities), each (rows, k): the k most likely tokens of each row of `logits`
    under its softmax, most likely first, the probabilities renormalised to sum to 1."""
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    z = np.take_along_axis(logits, top, axis=-1).astype(np.float64)
    order = np.argsort(-z, axis=-1, kind="stable")
    top, z = np.take_along_axis(top, order, axis=-1), np.take_along_axis(z, order, axis=-1)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return top.astype(np.int64), (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def teacher_targets(backend, sample: Sample, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The soft targets of one sample under the backend's current model (see the module doc)."""
    n = len(sample.ids)
    ids = np.zeros((n, k), dtype=np.int64)
    p = np.zeros((n, k), dtype=np.float32)
    ids[:, 0] = sample.ids
    p[:, 0] = 1.0
    where = [i for i in range(1, n) if sample.targets[i]]
    if where:
        logits = np.asarray(backend.logits(sample.ids), dtype=np.float32)
        top, prob = top_k_rows(logits[[i - 1 for i in where]], k)
        ids[where, :top.shape[1]], p[where, :prob.shape[1]] = top, prob
        p[where, prob.shape[1]:] = 0.0
    return ids, p


def attach_teacher(cfg, run, backend, samples: list[Sample], resume: bool) -> None:
    """Give every replay sample its soft targets: read from RUN/replay-teacher.npz when resuming
    (or when it holds these samples), else computed now from the fresh adapter and saved."""
    from mlxft import ui
    from mlxft.atomic import atomic_file

    k = cfg.data.replay_distill
    if k <= 0 or not samples:
        return
    path = run.path / TEACHER_FILE
    saved = _read(path, samples, k)
    if saved is None and resume:
        ui.warn(f"{path}: missing or not for these replay samples; replay trains on the base model's tokens")
        return
    started = time.perf_counter()
    if saved is None:
        saved = [teacher_targets(backend, s, k) for s in samples]
        arrays = {f"ids{i}": a for i, (a, _) in enumerate(saved)} | {f"p{i}": b for i, (_, b) in enumerate(saved)}
        arrays["tokens"] = np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in samples])
        with atomic_file(path, "wb") as fh:
            np.savez(fh, **arrays)
        ui.info(f"replay: the base model's top {k} tokens at every replay target, for distillation "
                f"({time.perf_counter() - started:.1f}s) -> {path}")
    for s, soft in zip(samples, saved):
        s.soft = soft


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
