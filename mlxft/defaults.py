"""Training settings mlxft chooses when the recipe leaves them open (null), and the one line
that says what was chosen and why.

- train.epochs: small data sets need several passes to learn what they teach (a fact seen
  once at a LoRA learning rate barely moves the loss), large ones do not. The choice is an
  upper bound: validation-driven early stopping (train.early_stop_patience) and the retention
  floor end training sooner once validation stops improving.
- train.learning_rate: by the model's width, 1e-3 at SmolLM2-135M's 576 scaled by
  (576 / hidden_size) ** 0.5 and kept within [2e-4, 1e-3]. 1e-3 was measured on the 135M and
  270M models (docs/retention.md); the width scaling above them follows the usual 1/sqrt(width)
  rule and is not measured here.
- train.eval_every: about twice per epoch, so early stopping and the retention floor act
  between passes, at most every 100 steps.
- retention.floor: 0.9, for every model. A model with its own chat template is scored on
  everyday questions and texts and replays its own chat answers; a base model (no chat template
  of its own) is scored on how it continues general passages and replays its own continuations
  of other passages (mlxft.text_replay). Without that text replay a base model learning a chat
  task lost its text behaviour fast (Gemma 3 270M: retention 0.52 within 30 steps), so the floor
  was off for base models before; the replay gives the floor something to hold on to.
- data.replay 0.2 trained as distillation (data.replay_distill 16: the base's top-16
  distribution on each replay token), plain dataclass defaults rather than chosen here. Against
  replay 0.5 of sampled tokens, the default before, on SmolLM2 and Gemma 3 270M over six tasks
  and two seeds: the same mean retention (0.963 against 0.959), higher held-out accuracy, about
  two thirds of the guard's cost and a lower peak (docs/retention.md). Preference runs keep 0.5
  of plain NLL (config.PREFERENCE_REPLAY).
"""

from __future__ import annotations

import math

# Epoch budget by training-set size (samples, epochs): the first row whose size bound holds.
EPOCH_BUDGET = ((200, 10), (1000, 5), (5000, 3), (20000, 2))
LARGE_DATA_EPOCHS = 1
LR_REFERENCE_WIDTH = 576
LR_AT_REFERENCE = 1e-3
LR_RANGE = (2e-4, 1e-3)
EVAL_EVERY_MAX = 100
RETENTION_FLOOR = 0.9


def auto_epochs(n_train: int) -> int:
    for bound, epochs in EPOCH_BUDGET:
        if n_train <= bound:
            return epochs
    return LARGE_DATA_EPOCHS


def auto_learning_rate(hidden_size: int | None) -> float:
    if not hidden_size:
        return LR_AT_REFERENCE
    lr = LR_AT_REFERENCE * math.sqrt(LR_REFERENCE_WIDTH / hidden_size)
    return float(min(max(lr, LR_RANGE[0]), LR_RANGE[1]))


def steps_per_epoch(n_train: int, batch_size: int, grad_accumulation: int) -> int:
    return max(1, math.ceil(max(1, math.ceil(n_train / batch_size)) / grad_accumulation))


def resolve(cfg, n_train: int, hidden_size: int | None, own_chat_format: bool = True) -> str | None:
    """Fill the open training settings in place; the line saying what was chosen, or None when
    the recipe set them all. `own_chat_format`: the model brought its own chat template."""
    t = cfg.train
    why = []
    if cfg.retention.floor is None:
        cfg.retention.floor = RETENTION_FLOOR
    if t.steps is None and t.epochs is None:
        t.epochs = float(auto_epochs(n_train))
        why.append(f"up to {t.epochs:g} epochs for {n_train} samples")
    if t.learning_rate is None:
        t.learning_rate = auto_learning_rate(hidden_size)
        width = f"hidden size {hidden_size}" if hidden_size else "model size unknown"
        why.append(f"learning rate {t.learning_rate:.1e} ({width})")
    if t.eval_every is None:
        per_epoch = steps_per_epoch(n_train, t.batch_size, t.grad_accumulation)
        t.eval_every = max(1, min(EVAL_EVERY_MAX, math.ceil(per_epoch / 2)))
        why.append(f"validation every {t.eval_every} steps")
    if not why:
        return None
    guards = []
    if t.early_stop_patience:
        guards.append(f"stop after {t.early_stop_patience} validations without improvement")
    if cfg.retention.enabled and cfg.retention.floor > 0:
        kind = "everyday questions" if own_chat_format else "text continuations (a base model)"
        changed = (f", at most {cfg.retention.max_changed} changed probe answers"
                   if cfg.retention.max_changed is not None else "")
        guards.append(f"keep retention >= {cfg.retention.floor:g} on {kind}{changed}")
    if cfg.data.replay > 0:
        what = "its own chat answers" if own_chat_format else "its own text continuations"
        how = f" towards its top-{cfg.data.replay_distill} distribution" if cfg.data.replay_distill else ""
        guards.append(f"replay {cfg.data.replay:g} of {what}{how}")
    return "chose " + ", ".join(why) + ("; " + ", ".join(guards) if guards else "")
