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
    order = sorted(range(len(ds.pairs)), key=lambda i: len(ds.pairs[i]))
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    rows = np.full((len(ds.pairs), 4), np.nan)
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


def is_pair_source(data: str, cfg) -> bool:
    """Whether `data` holds preference pairs (its first record says so)."""
    from mlxft.formats import read_records

    try:
        return read_records(data, columns=cfg.data.columns, limit=1, skip_bad_lines=True).fmt == "preference"
    except Exception:  # unreadable data fails later, with the usual one-line error
        return False


def evaluate_pairs(resolved, data: str, cfg, backend_name: str, load, batch_size: int, max_seq_len: int,
                   skip_bad_lines: bool, held_out: bool) -> dict:
    """`mlxft eval` on pairs: preference accuracy and log-probabilities of the base model and,
    for a run, of base plus adapter; with both, the DPO reward margin and reward accuracy of the
    tuned model against the base as reference (beta from the run's recipe, else 0.1)."""
    import gc

    from mlxft import ui
    from mlxft.preference.data import load_pairs, split_pairs

    engine = load(None)
    kw = dict(max_seq_len=max_seq_len, system_prompt=cfg.data.system_prompt, skip_bad_lines=skip_bad_lines,
              columns=cfg.data.columns)
    if held_out:
        _, ds = split_pairs(load_pairs(cfg.data.train, engine.tokenizer, split=cfg.data.split, limit=cfg.data.limit,
                                       **kw), cfg.data.valid_split, cfg.seed)
    else:
        ds = load_pairs(data, engine.tokenizer, **kw)
    out = {"model": resolved.spec, "data": str(data), "pairs": len(ds), "format": "preference", "backend": backend_name}
    with ui.console.status(f"Scoring {len(ds)} pairs"):
        base_rows = score_pairs(engine, ds, batch_size)
    base = _summary(base_rows)
    if resolved.adapter is None:
        out.update(base)
        return out
    del engine
    gc.collect()
    engine = load(resolved.adapter)
    with ui.console.status(f"Scoring {len(ds)} pairs with the adapter"):
        tuned_rows = score_pairs(engine, ds, batch_size)
    tuned = _summary(tuned_rows)
    beta = cfg.train.beta or 0.1
    dpo = figures(tuned_rows, Objective("dpo", beta), ref=base_rows[:, :2])
    tuned.update(reward_margin=dpo["reward_margin"], reward_accuracy=dpo["reward_accuracy"])
    out.update(base_model=str(resolved.path), adapter=str(resolved.adapter), base=base, tuned=tuned, beta=beta,
               delta={k: tuned[k] - base[k] for k in base})
    return out


def _summary(rows: np.ndarray) -> dict:
    return {"accuracy": preference_accuracy(rows), "chosen_logp": float(rows[:, 0].mean()),
            "rejected_logp": float(rows[:, 1].mean())}
