"""`mlxft eval`: loss, perplexity and token accuracy on a data set; base vs tuned for a run."""

from __future__ import annotations

import click

from mlxft.commands.options import (DATA_FORMATS, adapter_option, backend_option, json_option,
                                   skip_bad_lines_option, trust_remote_code_option)


@click.command("eval")
@click.argument("model_or_run", required=False)
@click.option("--data", "-d", type=click.Path(),
              help=f"Data to score: {DATA_FORMATS} (default for a run: its validation file, or the share of its training file "
                   "it held out).")
@backend_option()
@adapter_option()
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096))
@click.option("--max-seq-len", type=click.IntRange(8, 1_000_000),
              help="Truncate samples to this many tokens (default: the run's train.max_seq_len, else 512).")
@skip_bad_lines_option()
@trust_remote_code_option()
@json_option("Print the figures as JSON.")
def eval_command(model_or_run, data, backend, adapter, batch_size, max_seq_len, skip_bad_lines, trust_remote_code,
                 as_json):
    """Score MODEL_OR_RUN on a data set: loss, perplexity and token accuracy.

    The data is read and masked as for training (chat, completions or text; loss on assistant
    turns / completions). With a run directory the base model and the tuned model (base plus
    the run's best adapter) are scored side by side, with the difference. Without a model,
    the built-in SmolLM2-135M-Instruct.

    \b
    Examples:
      mlxft eval runs/quickstart --data recipes/data/quickstart/valid.jsonl
      mlxft eval HuggingFaceTB/SmolLM2-135M-Instruct --data test.jsonl --json
    """
    from mlxft import ui
    from mlxft.evaluate import evaluate

    result = evaluate(model_or_run, data, backend=backend, adapter=adapter, batch_size=batch_size,
                      max_seq_len=max_seq_len, skip_bad_lines=skip_bad_lines, trust_remote_code=trust_remote_code)
    if as_json:
        ui.emit_json(result)
        return
    if result.get("format") == "preference":
        from mlxft.preference.report import print_eval

        print_eval(result)
        return
    ui.result(f"{result['model']} on {result['data']}: {result['samples']} samples, "
              f"{result['tokens']:,} target tokens")
    rows = [("loss", "{:.4f}"), ("ppl", "{:.3f}"), ("accuracy", "{:.2%}")]
    names = {"loss": "loss (nats/token)", "ppl": "perplexity", "accuracy": "token accuracy"}
    if "base" not in result:
        for key, fmt in rows:
            ui.result(f"  {names[key]:<18} {fmt.format(result[key])}")
        return
    ui.result(f"  {'':<18} {'base':>10} {'tuned':>10} {'change':>10}")
    for key, fmt in rows:
        b, t, d = result["base"][key], result["tuned"][key], result["delta"][key]
        change = f"{d * 100:+.2f} pt" if key == "accuracy" else ("+" if d >= 0 else "") + fmt.format(d)
        ui.result(f"  {names[key]:<18} {fmt.format(b):>10} {fmt.format(t):>10} {change:>10}")
