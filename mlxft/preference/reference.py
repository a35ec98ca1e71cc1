"""The DPO reference: log-probabilities of every pair's chosen and rejected answer under the
starting model, computed once, batched, before the first step, and cached in the run folder
(RUN/reference_logps.json) so a step costs one policy forward and backward and --resume reads
them back instead of recomputing.

The starting model is the base with the adapter switched off when training a new adapter, and
the model as loaded (base plus that run's adapter) when --model is a run: in both cases the
policy the training starts from, which is what DPO's KL anchor means. The cache records a hash
of the token ids it was computed on; a mismatch (the data changed under a resumed run) is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from mlxft.atomic import atomic_file
from mlxft.errors import MlxftError
from mlxft.preference.data import PairDataset, collate_pairs
from mlxft.preference.ops import ops_for

CACHE_FILE = "reference_logps.json"


def fingerprint(ds: PairDataset) -> str:
    h = hashlib.sha256()
    for p in ds.pairs:
        for s in (p.chosen, p.rejected):
            h.update(np.asarray(s.ids, dtype=np.int64).tobytes())
            h.update(np.asarray(s.targets, dtype=np.int8).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def compute(backend, ds: PairDataset, batch_size: int, adapter_on: bool) -> np.ndarray:
    """(n, 2) float64: summed log-probability of (chosen, rejected) per pair, no gradients."""
    ops = ops_for(backend)
    pad = backend.tokenizer.pad_token_id
    out = np.zeros((len(ds.pairs), 2), dtype=np.float64)
    order = sorted(range(len(ds.pairs)), key=lambda i: len(ds.pairs[i]))
    switch = contextlib.nullcontext() if adapter_on else ops.adapter_off(backend)
    with switch:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            pc, pr, _, _ = ops.pair_logps(backend, collate_pairs([ds.pairs[i] for i in idx], pad))
            out[idx, 0], out[idx, 1] = pc, pr
    return out


def load_or_compute(run_path: Path | None, backend, sets: dict[str, PairDataset], batch_size: int,
                    adapter_on: bool, resume: bool) -> dict[str, np.ndarray]:
    """{name: (n, 2) reference log-probabilities} for each set, from the cache when it is there."""
    path = Path(run_path) / CACHE_FILE if run_path is not None else None
    prints = {name: fingerprint(ds) for name, ds in sets.items()}
    if resume and path is not None and path.is_file():
        saved = json.loads(path.read_text())
        for name, ds in sets.items():
            if saved.get("fingerprints", {}).get(name) != prints[name]:
                raise MlxftError(f"{path}: the reference log-probabilities were computed on other {name} data "
                                 "than this run now reads", "resume with the data the run started with")
        return {name: np.asarray(saved["logps"][name], dtype=np.float64).reshape(-1, 2) for name in sets}
    refs = {name: compute(backend, ds, batch_size, adapter_on) for name, ds in sets.items()}
    if path is not None:
        blob = {"reference": "starting adapter" if adapter_on else "base model (adapter off)",
                "fingerprints": prints, "logps": {name: r.tolist() for name, r in refs.items()}}
        with atomic_file(path, "w") as fh:
            json.dump(blob, fh)
    return refs
