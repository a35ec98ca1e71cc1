"""The resume checkpoint, RUN/checkpoint/: written atomically by rank 0 and read back by every rank.

    adapter/           the adapter at the checkpoint's step (PEFT layout)
    <backend state>    the backend's optimizer and RNG state (Backend.save_state)
    ranks/N/           every other rank's optimizer and RNG state (distributed runs)
    trainer.json       the trainer's state (step, data cursor, best and chosen figures, early-stop
                       counter), Python's and NumPy's RNG states, and the world size

In a distributed world every rank's state is gathered to rank 0 before anything is written, so a
rank that dies mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import ast
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from mlxft.atomic import atomic_dir, write_errors
from mlxft.distributed import bytes_to_dir, dir_to_bytes
from mlxft.errors import MlxftError

TRAINER_FILE = "trainer.json"


def save(folder: Path, backend, world, state: dict, *, writes: bool) -> None:
    """Write the checkpoint of `backend` and the trainer `state` to `folder` (rank 0 writes when
    `writes`; in a distributed world every rank must call this, as it gathers their states)."""
    rank_states = None
    if world.distributed:
        # Gather first: if a rank is gone this raises before a byte is written.
        with tempfile.TemporaryDirectory(prefix="mlxft-state-") as d:
            backend.save_state(Path(d))
            rank_states = world.all_gather_bytes(dir_to_bytes(Path(d)))
    if not writes:
        return
    with write_errors("checkpoint", folder), atomic_dir(folder) as tmp:
        backend.save_adapter(tmp / "adapter")
        if rank_states is None:
            backend.save_state(tmp)
        else:
            bytes_to_dir(rank_states[0], tmp)
            for r, blob in enumerate(rank_states[1:], start=1):
                bytes_to_dir(blob, tmp / "ranks" / str(r))
        extra = {"python_rng": repr(random.getstate()), "numpy_rng": _np_rng_state(), "world_size": world.size}
        (tmp / TRAINER_FILE).write_text(json.dumps({"state": state, **extra}, indent=2))


def restore(folder: Path, backend, world) -> dict:
    """Load this rank's backend state and the Python/NumPy RNG states from `folder`; return the
    trainer state saved there."""
    try:
        data = json.loads((folder / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MlxftError(f"{folder}: no usable checkpoint to resume from ({exc})") from None
    restore_rng(data)
    own = folder / "ranks" / str(world.rank)
    # A rank the checkpoint has no state for (the world grew) starts from rank 0's optimizer
    # state, which every rank shares; only its dropout stream differs from an unbroken run.
    backend.load_state(own if world.rank and own.is_dir() else folder)
    return data["state"]


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def restore_rng(saved: dict) -> None:
    """Put back the Python and NumPy RNG states `save` wrote (absent in older checkpoints)."""
    if "python_rng" in saved:
        random.setstate(ast.literal_eval(saved["python_rng"]))
    if "numpy_rng" in saved:
        name, keys, pos, has_gauss, cached = saved["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
