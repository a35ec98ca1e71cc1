"""Scripted validation for the forgetting-guard tests: the trainer sees given validation losses
and retention scores instead of computing them (tests/test_forgetting_guard.py, test_base_guard.py)."""

from pathlib import Path


def script_validation(monkeypatch, losses, scores):
    """Validation losses (step 0 first) and retention scores, one per step from step 1 (the
    runs validate at every step). A score belongs to the adapter of its step, whenever it is
    scored: at that step's validation, or after training when the trainer loads that step's
    candidate adapter (retention.score_at: lazy)."""
    import mlxft.retention
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.trainer import Trainer

    losses, holds = iter(losses), {}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"loss": next(losses), "ppl": 1.0, "accuracy": 0.5,
                                                           "tokens": 1})
    validate, load = Trainer._validate, TorchBackend.load_adapter_weights

    def scripted_validate(self, step, metrics, progress):
        holds["step"] = step
        return validate(self, step, metrics, progress)

    def scripted_load(self, adapter):
        if Path(adapter).name.startswith("step-"):
            holds["step"] = int(Path(adapter).name[len("step-"):])
        return load(self, adapter)

    monkeypatch.setattr(Trainer, "_validate", scripted_validate)
    monkeypatch.setattr(TorchBackend, "load_adapter_weights", scripted_load)
    monkeypatch.setattr(mlxft.retention, "tracker", lambda run, backend: lambda: {
        "score": scores[holds["step"] - 1], "agreement": 1.0, "nats_per_token": 0.0})
