"""Preference tuning from pairs of answers (`train.method: dpo | orpo`).

    records.py    TRL's preference formats checked into one canonical pair record
    data.py       pairs tokenized with the chat template (loss on the answer only), batched
    losses.py     the DPO and ORPO formulas, written once for both backends' arrays
    torch_ops.py  per-answer log-probabilities, the reference switch and one step on PyTorch
    mlx_ops.py    the same on MLX
    reference.py  the reference log-probabilities, computed once and cached in the run folder
    evaluate.py   reward margin, preference accuracy and log-probabilities of held-out pairs
    trainer.py    the shared training loop with the preference step and validation
"""

METHODS = ("sft", "dpo", "orpo")
PREFERENCE_METHODS = ("dpo", "orpo")
