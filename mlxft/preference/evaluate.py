"""Figures of a model on held-out preference pairs, at every validation and in `mlxft eval`:

    loss              the training objective (DPO or ORPO) over all pairs
    reward_margin     mean of reward(chosen) - reward(rejected); DPO: beta x the policy-minus-reference
                      log-ratio, ORPO: beta x the mean per-token log-probability (TRL's definitions)
    reward_accuracy   share of pairs whose chosen reward exceeds the rejected one (TRL's
                      rewards/accuracies; 0 for DPO before training, where policy = reference)
    accuracy          preference accuracy: share of pairs where the model gives the chosen answer
                      a higher mean per-token log-probability than the rejected one. It needs no
                      reference, so base and tuned models are compared on it (`mlxft eval`), and
                      the per-token mean keeps it from simply favouring the shorter answer.
    chosen_logp, rejected_logp   mean over pairs of the summed answer log-probability
"""

from __future__ import annotations

import numpy as np

from mlxft.preference.data import PairDataset, collate_pairs
from mlxft.preference.losses import Objective
from mlxft.preference.ops import ops_for


class NumpyOps:
    @staticmethod
    def logsigmoid(x):
        return -np.logaddexp(0.0, -x)

    @staticmethod
    def log1mexp(x):
        return np.where(x < -np.log(2.0), np.log1p(-np.exp(np.minimum(x, 0))), np.log(-np.expm1(np.minimum(x, -1e-300))))


def score_pairs(backend, ds: PairDataset, batch_size: int = 8, max_batches: int | None = None) -> np.ndarray:
    """(n, 4) float64: pc, pr, nc, nr per pair of `ds` (no gradients, eval mode)."""
    ops = ops_for(backend)
    pad = backend.tokenizer.pad_token_id
    order = sorted(range(len(ds)), key=lambda i: len(ds.pairs[i]))
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    rows = np.full((len(ds), 4), np.nan)
    for idx in batches:
        pc, pr, nc, nr = ops.pair_logps(backend, collate_pairs([ds.pairs[i] for i in idx], pad))
        rows[idx] = np.stack([pc, pr, nc, nr], axis=1)
    return rows


def figures(scores: np.ndarray, objective: Objective, ref: np.ndarray | None = None) -> dict:
    """The validation figures from score_pairs' rows (and the reference's, for DPO)."""
    keep = ~np.isnan(scores[:, 0])
    pc, pr, nc, nr = scores[keep].T
    rc, rr = (ref[keep, 0], ref[keep, 1]) if ref is not None else (None, None)
    loss, chosen, rejected = objective.step_loss(NumpyOps, pc, pr, nc, nr, rc, rr, len(pc), int(nc.sum()))
    return {"loss": float(loss), "reward_margin": float(np.mean(chosen - rejected)),
            "reward_accuracy": float(np.mean(chosen > rejected)),
            "accuracy": preference_accuracy(scores[keep]),
            "chosen_logp": float(pc.mean()), "rejected_logp": float(pr.mean()), "pairs": int(keep.sum())}


def preference_accuracy(scores: np.ndarray) -> float:
    pc, pr, nc, nr = scores.T
    return float(np.mean(pc / nc > pr / nr))
