"""Options that several commands share, defined once (as simonw/llm does), so that each has one
spelling, one short flag and one help text everywhere:

    --backend/-b            the compute backend
    --adapter best|last     which adapter of a run
    --output/-o             what to write (--out kept as an alias: scripts call `train --out`)
    --trust-remote-code     on every command that loads a model or its tokenizer
    --skip-bad-lines        data rows that cannot be used are skipped and counted
    --set KEY=VALUE         a recipe key
    --json                  the result as JSON on stdout

Short flags mean one thing across commands: -p is --prompt (serve's --port has no short
flag), -r is --recipe (pull's --revision has none), -o is --output, -q is --quant.
"""

from __future__ import annotations

import click

BACKENDS = ("auto", "torch", "mlx")
DATA_FORMATS = "JSONL, JSON, CSV, TSV, Parquet, a saved dataset folder or hf:NAME"


def backend_option(default: str | None = "auto", help: str = "Compute backend (auto: MLX on Apple silicon, "
                   "else PyTorch on CUDA or CPU)."):
    return click.option("--backend", "-b", type=click.Choice(BACKENDS), default=default,
                        show_default=default is not None, help=help)


def weights_option(extra: str = ""):
    """--dtype: the dtype the PyTorch backend keeps the Linear weights in to generate on a CPU
    (mlxft.decode.weights)."""
    from mlxft.decode.weights import WEIGHT_DTYPES

    return click.option("--dtype", "weights", type=click.Choice(list(WEIGHT_DTYPES)),
                        default="auto", show_default=True,
                        help="PyTorch on a CPU: the dtype the weights are kept in to generate (activations stay "
                             "float32). auto: measured on this model and CPU, a 16-bit dtype only where it decodes "
                             "one stream and a batch of 8 no slower than float32 and one of them clearly faster "
                             "(the same choice in generate, chat and serve, so they give the same text); float32 "
                             "is the model exactly as trained. MLX ignores it. " + extra)


def adapter_option(help: str = "Which adapter of a run to use: the best by validation, or the last saved."):
    return click.option("--adapter", type=click.Choice(["best", "last"]), default="best", show_default=True,
                        help=help)


def output_option(name: str = "output", *, required: bool = False, type=None, help: str):
    """--output/-o, with --out accepted as the same option."""
    return click.option("--output", "-o", "--out", name, required=required, type=type or click.Path(), help=help)


def trust_remote_code_option():
    return click.option("--trust-remote-code", is_flag=True,
                        help="Allow Python code shipped inside the model repo to run.")


def skip_bad_lines_option():
    return click.option("--skip-bad-lines", is_flag=True,
                        help="Skip data rows that cannot be used (counted and reported).")


def set_option(example: str = "train.steps=100"):
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help=f"Override a recipe key, e.g. {example}.")


def json_option(help: str = "Print the result as JSON on stdout."):
    return click.option("--json", "as_json", is_flag=True, help=help)
