"""The training loop for DPO and ORPO: mlxft.trainer.Trainer (data order, schedule, validation,
early stopping, best adapter, retention floor, checkpoints, exact resume, distributed ranks),
with pairs in place of samples, the preference step, and validation on held-out pairs.

A micro-batch is train.batch_size pairs, run as one [chosen; rejected] batch of twice as many
rows; the step loss is normalised by the pair count of the whole step (and ORPO's NLL by its
chosen-answer token count), so accumulation and ranks add up as SFT's do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxft.data import Batch
from mlxft.preference.data import PairDataset, collate_pairs
from mlxft.preference.evaluate import figures, score_pairs
from mlxft.preference.losses import Objective
from mlxft.preference.ops import ops_for
from mlxft.trainer import Trainer


@dataclass
class PairBatch:
    batch: Batch                 # chosen rows, then rejected rows
    ref: np.ndarray | None       # (n, 2) reference log-probabilities (DPO), else None

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens


def objective_of(cfg) -> Objective:
    t = cfg.train
    return Objective(method=t.method, beta=t.beta, label_smoothing=t.label_smoothing)


class PreferenceTrainer(Trainer):
    def __init__(self, cfg, run, backend, train_set: PairDataset, valid_set: PairDataset,
                 references: dict[str, np.ndarray] | None = None, **kw):
        super().__init__(cfg, run, backend, train_set, valid_set, **kw)
        self.objective = objective_of(cfg)
        self.references = references or {}
        self.ops = ops_for(backend)
        self._chosen_tokens = 0

    def _ref(self, name: str, indices) -> np.ndarray | None:
        ref = self.references.get(name) if self.objective.needs_reference else None
        return None if ref is None else ref[indices]

    def _next_step_batches(self):
        rank, size, s = self.world.rank, self.world.size, self.state
        local, n_pairs, n_tokens, n_chosen = [], 0, 0, 0
        for _ in range(self.cfg.train.grad_accumulation):
            indices, s.epoch, s.batch_index = self.order.next(s.epoch, s.batch_index)
            pairs = [self.train_set.pairs[i] for i in indices]
            n_pairs += len(pairs)
            n_tokens += sum(len(p.chosen) + len(p.rejected) for p in pairs)
            n_chosen += sum(p.chosen.n_targets for p in pairs)
            mine = indices[rank::size]
            if mine:
                local.append(PairBatch(collate_pairs([self.train_set.pairs[i] for i in mine], self.pad_id),
                                       self._ref("train", mine)))
        self._chosen_tokens = n_chosen
        return local, n_pairs, n_tokens

    def _train_step(self, micro, lr, n_targets):
        return self.ops.train_step(self.backend, micro, lr, self.objective, n_targets, self._chosen_tokens)

    def evaluate(self) -> dict:
        scores = score_pairs(self.backend, self.valid_set, self.cfg.train.batch_size, self.cfg.train.eval_batches)
        return figures(scores, self.objective, self.references.get("valid") if self.objective.needs_reference
                       else None)
