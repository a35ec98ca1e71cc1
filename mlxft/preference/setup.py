"""What `mlxft train` does differently for `train.method: dpo | orpo`: read pairs instead of
samples, fill the open settings with preference defaults, and build the trainer with the
reference log-probabilities (DPO) loaded from the run folder or computed once.

Defaults (when the recipe leaves them null), said in the run's one `defaults:` line:
- train.beta 0.1 for both methods (TRL's DPOTrainer and ORPOTrainer defaults);
- train.learning_rate: half of what mlxft picks for SFT at the model's width for DPO (its
  gradient is beta-scaled and rises with the margin; a LoRA at the SFT rate overshoots the
  reference within an epoch of a small set), the SFT rate for ORPO (it carries an SFT term);
- train.epochs: mlxft's SFT epoch budget for the pair count, at most 6 (measured: at 3 the
  content set's runs used the whole budget still learning, ORPO judged 50% -> 75% at 6 and no
  better at 10; early stopping ends runs that stop improving sooner);
- train.sft_weight 1.0 for DPO: the chosen answers' NLL added to DPO's loss (TRL's "sft" loss
  type, the RPO paper's alpha = 1). DPO alone ranks held-out pairs right but can leave greedy
  answers as they were: it pushes the rejected answer down more than it lifts the chosen one;
- data.replay 0.5 (config.PREFERENCE_REPLAY, set by build_config where nothing named it; SFT's
  default is 0.2 as distillation): the base model's own answers train as NLL-only samples (they
  have no rejected answer, so no DPO/ORPO term), so the retention floor has something to hold.
"""

from __future__ import annotations

import json

from mlxft import ui
from mlxft.errors import ConfigError, MlxftError
from mlxft.preference.data import PairDataset, load_pairs, split_pairs

DEFAULT_BETA = 0.1
DEFAULT_SFT_WEIGHT = 1.0
DPO_LR_FACTOR = 0.5
MAX_EPOCHS = 6


def load_pair_data(cfg, tokenizer, skip_bad_lines: bool = False) -> tuple[PairDataset, PairDataset]:
    if not cfg.data.train:
        raise ConfigError("data.train: no training data", "pass --data PAIRS.jsonl or set data.train in the recipe")
    kw = dict(max_seq_len=cfg.train.max_seq_len, system_prompt=cfg.data.system_prompt,
              skip_bad_lines=skip_bad_lines, columns=cfg.data.columns, limit=cfg.data.limit)
    train = load_pairs(cfg.data.train, tokenizer, split=cfg.data.split, **kw)
    if cfg.data.valid:
        valid = load_pairs(cfg.data.valid, tokenizer, **kw)
    else:
        train, valid = split_pairs(train, cfg.data.valid_split, cfg.seed)
    for ds in (train, valid):
        if ds.truncated:
            ui.warn(f"{ds.path}: {ds.truncated} pairs longer than train.max_seq_len={cfg.train.max_seq_len} "
                    "were truncated")
        if ds.skipped:
            ui.warn(f"{ds.path}: skipped {len(ds.skipped)} bad lines (first: {ds.skipped[0]})")
    from mlxft.preference.check import report_pairs_at_train_start

    report_pairs_at_train_start(train, valid, tokenizer)
    return train, valid


def preference_defaults(cfg, n_train: int, hidden_size: int | None) -> str | None:
    """Fill beta, the SFT weight (DPO), learning rate and epochs for dpo/orpo; a phrase saying
    what was chosen."""
    from mlxft.defaults import auto_epochs, auto_learning_rate

    t, why = cfg.train, []
    if t.beta is None:
        t.beta = DEFAULT_BETA
        why.append(f"beta {t.beta:g}")
    if t.method == "dpo" and t.sft_weight is None:
        t.sft_weight = DEFAULT_SFT_WEIGHT
        why.append(f"sft_weight {t.sft_weight:g} (NLL of the chosen answers)")
    if t.learning_rate is None:
        t.learning_rate = auto_learning_rate(hidden_size) * (DPO_LR_FACTOR if t.method == "dpo" else 1.0)
        why.append(f"learning rate {t.learning_rate:.1e} ({t.method}, hidden size {hidden_size or 'unknown'})")
    if t.steps is None and t.epochs is None:
        t.epochs = float(min(auto_epochs(n_train), MAX_EPOCHS))
        why.append(f"up to {t.epochs:g} epochs for {n_train} pairs")
    return f"{t.method}: " + ", ".join(why) if why else None


def references(cfg, run, backend, world, train_set, valid_set, start_adapter, resume: bool) -> dict:
    """The DPO reference log-probabilities of both sets (rank 0 computes or reads them and sends
    them to the other ranks); {} for ORPO, which has no reference."""
    if cfg.train.method != "dpo":
        return {}
    import numpy as np

    from mlxft.preference.reference import CACHE_FILE, load_or_compute

    if resume and world.is_root and not (run.path / CACHE_FILE).is_file():
        raise MlxftError(f"--resume {run.path}: {CACHE_FILE} is missing, so the reference of this DPO run is lost",
                         "start the run again")
    refs = None
    if world.is_root:
        with ui.console.status("Computing the reference log-probabilities"):
            refs = load_or_compute(run.path, backend, {"train": train_set, "valid": valid_set},
                                   cfg.train.batch_size, adapter_on=start_adapter is not None, resume=resume)
    if world.distributed:
        blob = json.dumps({k: v.tolist() for k, v in refs.items()}).encode() if world.is_root else None
        refs = {k: np.asarray(v, dtype=np.float64).reshape(-1, 2)
                for k, v in json.loads(world.broadcast_bytes(blob)).items()}
    return refs
