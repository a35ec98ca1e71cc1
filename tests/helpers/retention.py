"""Scripted validation for the forgetting-guard tests: the trainer sees given validation losses
and retention scores instead of computing them (tests/test_forgetting_guard.py, test_base_guard.py)."""


def script_validation(monkeypatch, losses, scores):
    """Validation losses (step 0 first) and retention scores (one per validation after step 0)."""
    import mlxft.retention
    from mlxft.trainer import Trainer

    losses, scores = iter(losses), iter(scores)
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"loss": next(losses), "ppl": 1.0, "accuracy": 0.5,
                                                           "tokens": 1})
    monkeypatch.setattr(mlxft.retention, "tracker", lambda run, backend: lambda: {
        "score": next(scores), "agreement": 1.0, "nats_per_token": 0.0})
