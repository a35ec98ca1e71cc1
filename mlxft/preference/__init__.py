"""Preference tuning from pairs of answers (`train.method: dpo | orpo`); docs/preference.md.
TRL's pair formats are read by mlxft/formats/pairs.py, with the other record shapes.

    data.py       pairs tokenized with the chat template (loss on the answer only), batched
    check.py      what `mlxft data check` finds in pairs
    losses.py     the DPO and ORPO formulas, written once for both backends' arrays
    ops.py        picks torch_ops.py or mlx_ops.py: per-answer log-probabilities, the reference
                  switch (adapter off) and one optimizer step on each backend
    reference.py  the reference log-probabilities, computed once and cached in the run folder
    evaluate.py   reward margin, preference accuracy and log-probabilities of held-out pairs
    trainer.py    the shared training loop with the preference step and validation
    setup.py      what `mlxft train` does differently for dpo/orpo (data, defaults, reference)
    report.py     `mlxft eval` output on pairs
"""

from mlxft.config import METHODS  # noqa: F401  (the config validates train.method)
