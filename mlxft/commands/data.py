"""`mlxft data check`: report what in the training data would spoil a fine-tune."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mlxft.commands.options import json_option, set_option, trust_remote_code_option

VALID_WORDS = {"valid", "validation", "val", "dev", "eval", "test"}


def is_validation_name(spec: str) -> bool:
    """train.jsonl -> False; valid.jsonl, my_val.csv, eval-set.parquet -> True."""
    stem = Path(spec.split(":", 1)[-1] if spec.startswith("hf:") else spec).stem.lower()
    return bool(VALID_WORDS & set(re.split(r"[^a-z0-9]+", stem)))


@click.group()
def data():
    """Inspect training data."""


@data.command("check")
@click.argument("files", nargs=-1)
@click.option("--valid", "valid_files", multiple=True, help="A validation file (repeatable). Files named "
              "*valid*, *val*, *dev*, *eval* or *test* among FILES count as validation too.")
@click.option("--model", "-m", help="Model whose tokenizer and chat template to use (default: the recipe's, "
              "or the built-in SmolLM2-135M-Instruct).")
@click.option("--recipe", "-r", help="Take data files, data.* options and train.max_seq_len from a recipe.")
@click.option("--max-seq-len", type=int, help="Length limit to check against (default: train.max_seq_len).")
@set_option("data.columns=...")
@trust_remote_code_option()
@json_option("Print the report as JSON on stdout.")
def check(files, valid_files, model, recipe, max_seq_len, sets, trust_remote_code, as_json):
    """Check FILE... (JSONL, JSON, CSV, TSV, Parquet, a saved dataset folder or hf:NAME) before training.

    Reports format and sample count, token lengths against train.max_seq_len and what gets
    truncated, the share of tokens that carry loss, exact and near duplicates, train/validation
    leakage, very short answers, answers that never end, and one sample with its trained spans
    highlighted, and says what to do about each problem.

    \b
    Examples:
      mlxft data check train.jsonl valid.jsonl
      mlxft data check data.csv --set 'data.columns={prompt: question, completion: answer}'
      mlxft data check --recipe quickstart --json
    """
    from mlxft import ui
    from mlxft.config import build_config
    from mlxft.datacheck import analyze, print_report
    from mlxft.sources import resolve_model
    from mlxft.tokenizer import load_tokenizer
    from mlxft.training_data import read_source

    cfg = build_config(recipe, sets, {"model": model, "train": {"max_seq_len": max_seq_len}})
    train_files = [f for f in files if not is_validation_name(f)]
    valid_files = [*valid_files, *(f for f in files if is_validation_name(f))]
    if not files and not valid_files:
        train_files = [cfg.data.train] if cfg.data.train else []
        valid_files = [cfg.data.valid] if cfg.data.valid else []
    if not train_files and not valid_files:
        raise click.UsageError("give data FILE(s), or --recipe with data.train")
    ui.quiet_libraries()
    resolved = resolve_model(cfg.model)
    with ui.console.status(f"Loading the tokenizer of {resolved.spec}"):
        tokenizer = load_tokenizer(resolved.path, trust_remote_code)
    with ui.console.status("Reading and tokenizing"):
        train = [read_source(cfg, f, tokenizer, train=True, skip_bad_lines=True) for f in train_files]
        valid = [read_source(cfg, f, tokenizer, train=False, skip_bad_lines=True) for f in valid_files]
    with ui.console.status("Checking"):
        report = analyze(train, valid, tokenizer, cfg.train.max_seq_len)
        if any(ds.fmt == "preference" for ds in train + valid):
            from mlxft.preference.check import add_to_report

            add_to_report(report, train_files, valid_files, tokenizer, cfg)
    report["model"] = resolved.spec
    if as_json:
        ui.emit_json(report)
    else:
        print_report(report)
