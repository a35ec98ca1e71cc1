"""The training loop for DPO and ORPO: mlxft.trainer.Trainer (data order, schedule, validation,
early stopping, best adapter, retention floor, checkpoints, exact resume, distributed ranks),
with pairs in place of samples, the preference step, and validation on held-out pairs.

A micro-batch is train.batch_size items of the training set, pairs and (with data.replay) the
base model's replay answers, run as one [chosen; rejected; replay] batch; the step loss is
normalised by the pair count of the whole step (and the NLL terms by its chosen-answer and
replay token counts), so accumulation and ranks add up as SFT's do.
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
    batch: Batch                 # chosen rows, then rejected rows (then replay rows)
    ref: np.ndarray | None       # (n, 2) reference log-probabilities (DPO), else None
    n_pairs: int | None = None   # n; None: every row belongs to a pair (no replay rows)

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def pairs_in_batch(self) -> int:
        return self.batch.input_ids.shape[0] // 2 if self.n_pairs is None else self.n_pairs


@dataclass
class StepCounts:
    """What the whole (global) step holds, by which each micro-batch's loss is normalised."""
    pairs: int
    chosen_tokens: int
    replay_tokens: int = 0


def objective_of(cfg) -> Objective:
    t = cfg.train
    return Objective(method=t.method, beta=t.beta, label_smoothing=t.label_smoothing,
                     sft_weight=t.sft_weight or 0.0)


class PreferenceTrainer(Trainer):
    def __init__(self, cfg, run, backend, train_set: PairDataset, valid_set: PairDataset,
                 references: dict[str, np.ndarray] | None = None, **kw):
        super().__init__(cfg, run, backend, train_set, valid_set, **kw)
        self.objective = objective_of(cfg)
        self.references = references or {}
        self.ops = ops_for(backend)
        self._counts = StepCounts(0, 0)

    def _ref(self, name: str, indices) -> np.ndarray | None:
        ref = self.references.get(name) if self.objective.needs_reference else None
        return None if ref is None else ref[indices]

    def _split(self, indices) -> tuple[list[int], list[int]]:
        """Item indices as (pair indices, replay indices): replay samples follow the pairs."""
        n = len(self.train_set.pairs)
        return [i for i in indices if i < n], [i - n for i in indices if i >= n]

    def _next_step_batches(self):
        rank, size, s = self.world.rank, self.world.size, self.state
        local, counts, n_tokens = [], StepCounts(0, 0), 0
        pairs_of, replay_of = self.train_set.pairs, self.train_set.replay
        for _ in range(self.cfg.train.grad_accumulation):
            indices, s.epoch, s.batch_index = self.order.next(s.epoch, s.batch_index)
            pair_ids, replay_ids = self._split(indices)
            counts.pairs += len(pair_ids)
            counts.chosen_tokens += sum(pairs_of[i].chosen.n_targets for i in pair_ids)
            counts.replay_tokens += sum(replay_of[i].n_targets for i in replay_ids)
            n_tokens += sum(len(pairs_of[i].chosen) + len(pairs_of[i].rejected) for i in pair_ids)
            n_tokens += sum(len(replay_of[i]) for i in replay_ids)
            mine_pairs, mine_replay = self._split(indices[rank::size])
            if mine_pairs or mine_replay:
                batch = collate_pairs([pairs_of[i] for i in mine_pairs], self.pad_id,
                                      [replay_of[i] for i in mine_replay])
                local.append(PairBatch(batch, self._ref("train", mine_pairs), n_pairs=len(mine_pairs)))
        self._counts = counts
        return local, counts.pairs, n_tokens

    def _train_step(self, micro, lr, n_targets):
        return self.ops.train_step(self.backend, micro, lr, self.objective, self._counts)

    def evaluate(self) -> dict:
        scores = score_pairs(self.backend, self.valid_set, self.cfg.train.batch_size, self.cfg.train.eval_batches)
        return figures(scores, self.objective, self.references.get("valid") if self.objective.needs_reference
                       else None)
