"""The quickstart on the real SmolLM2-135M-Instruct, with mlxft's defaults: it learns made-up
facts, keeps retention at the floor or above (no warning) and still knows a general fact. Slow
tier (a few minutes on 2 CPU cores)."""

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_learns_a_fact_and_keeps_paris(default_model_dir, tmp_path):
    from mlxft.config import build_config
    from mlxft.inference import format_prompt, load_for_inference
    from mlxft.pipeline import train_run

    cfg = build_config("quickstart")
    summary = train_run(cfg, tmp_path / "qs")
    assert summary["chosen_val_loss"] < 0.5
    assert summary["retention"]["score"] >= 0.9 and "warning" not in summary["retention"]
    assert summary["verdict"]["learned"] and summary["verdict"]["kept"]
    engine, _ = load_for_inference(str(tmp_path / "qs"), backend="torch")

    def ask(q):
        ids = engine.generate(format_prompt(engine.tokenizer, q), 40)
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    assert "Marta Lindqvist" in ask("Who founded Brightwater Bicycles?")
    assert "555-0142" in ask("How can I call Brightwater Bicycles?")
    assert "Paris" in ask("What is the capital of France?")
