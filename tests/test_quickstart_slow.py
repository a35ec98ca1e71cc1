"""The quickstart on the real SmolLM2-135M-Instruct: it learns a made-up fact and still knows
a general one. Slow tier (a few minutes on 2 CPU cores)."""

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_learns_a_fact_and_keeps_paris(default_model_dir, tmp_path):
    from mlxft.config import build_config
    from mlxft.inference import format_prompt, load_for_inference
    from mlxft.pipeline import train_run

    cfg = build_config("quickstart", ["retention.enabled=false"])
    summary = train_run(cfg, tmp_path / "qs")
    assert summary["best_val_loss"] < 0.5
    engine, _ = load_for_inference(str(tmp_path / "qs"), backend="torch")

    def ask(q):
        ids = engine.generate(format_prompt(engine.tokenizer, q), 40)
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    assert "Marta Lindqvist" in ask("Who founded Brightwater Bicycles?")
    assert "555-0142" in ask("How can I call Brightwater Bicycles?")
    assert "Paris" in ask("What is the capital of France?")
