"""A checkpoint restores the Python and NumPy RNG states it saved, so a resumed run draws the
same random numbers after the checkpoint as the unbroken run did."""

from __future__ import annotations

import random
import types

import numpy as np

from mlxft.data import Dataset, Sample
from mlxft.distributed import World
from mlxft.runs import Run
from mlxft.trainer import Trainer


class _Backend:
    """Just enough of a backend for save_checkpoint/restore_checkpoint (no model)."""

    world = World()
    tokenizer = types.SimpleNamespace(pad_token_id=0)

    def trainable_finite(self):
        return True

    def save_adapter(self, path):
        path.mkdir(parents=True, exist_ok=True)

    def save_state(self, path):
        pass

    def load_state(self, path):
        pass

    def hidden_size(self):
        return None


def _trainer(tmp_path) -> Trainer:
    from mlxft.config import Config
    from mlxft.defaults import resolve

    train = Dataset(samples=[Sample(ids=[1, 2, 3], targets=[False, True, True])], fmt="chat", path="x")
    cfg = Config()
    resolve(cfg, len(train), None)
    return Trainer(cfg, Run(tmp_path / "run"), _Backend(), train, train)


def test_restore_checkpoint_puts_back_python_and_numpy_rng(tmp_path):
    (tmp_path / "run").mkdir()
    trainer = _trainer(tmp_path)
    random.seed(11)
    np.random.seed(11)
    random.random(), np.random.rand(3)  # advance both streams past their seeded start
    trainer.save_checkpoint()
    after_save = (random.random(), np.random.rand(3).tolist(), np.random.normal())
    random.seed(99)
    np.random.seed(99)
    _trainer(tmp_path).restore_checkpoint()
    assert (random.random(), np.random.rand(3).tolist(), np.random.normal()) == after_save
