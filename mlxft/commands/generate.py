"""`mlxft generate`: completions from a model or a run (base plus its adapter): one prompt
streamed, or a file of prompts answered side by side in batches."""

from __future__ import annotations

import sys

import click

from mlxft.commands.options import (adapter_option, backend_option, json_option, trust_remote_code_option,
                                    weights_option)


@click.command()
@click.argument("model_or_run", required=False)
@click.option("--prompt", "-p", help="The prompt (a user message unless --raw).")
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="Answer many prompts, batched: a text file (one prompt a line) or JSONL with a 'prompt' "
                   "field; prints one JSON line {prompt, text} per prompt.")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1, 100000))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0, 10),
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--system", "-s", help="System prompt (default: the run's, if it set one).")
@click.option("--raw", is_flag=True, help="Send the prompt as-is, without the chat template.")
@backend_option()
@adapter_option(
              help="Which adapter of a run to use.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for sampling (--temperature > 0): the same seed gives the same answer.")
@weights_option()
@trust_remote_code_option()
@json_option("Print {prompt, text, tokens} as JSON instead of streaming.")
def generate(model_or_run, prompt, prompts_file, max_tokens, temperature, top_p, system, raw, backend, adapter,
             seed, weights, trust_remote_code, as_json):
    """Generate text from MODEL_OR_RUN (default: the built-in SmolLM2-135M-Instruct).

    A run directory means its base model plus its best adapter. The answer streams to stdout.
    """
    import json

    from mlxft import ui
    from mlxft.inference import (TokenPrinter, format_prompt, load_for_inference, run_stop_ids, run_system_prompt,
                                 weights_note)

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompts-file")
    prompts = read_prompts(prompts_file) if prompts_file else None
    with ui.console.status("Loading model"):
        engine, resolved = load_for_inference(model_or_run, backend, adapter, trust_remote_code, seed, weights)
    note = weights_note(engine)
    if note:
        ui.info(f"generating with{note[1:]}")
    if system is None:
        system = run_system_prompt(resolved)
    if prompts is not None:
        ids = [format_prompt(engine.tokenizer, p, raw=raw, system=system) for p in prompts]
        with ui.console.status(f"Answering {len(ids)} prompts"):
            outs = engine.generate_batch(ids, max_tokens, temperature=temperature, top_p=top_p)
        for p, out in zip(prompts, outs):
            ui.result(json.dumps({"prompt": p, "text": engine.tokenizer.decode(out, skip_special_tokens=True),
                                  "tokens": len(out)}))
        return
    ids = format_prompt(engine.tokenizer, prompt, raw=raw, system=system)

    def write(text):
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    printer = TokenPrinter(engine.tokenizer, write)
    engine.generate(ids, max_tokens, temperature=temperature, top_p=top_p, on_token=printer,
                    stop_ids=run_stop_ids(engine))
    if as_json:
        ui.emit_json({"model": resolved.spec, "prompt": prompt, "text": printer.text(), "tokens": len(printer.ids)})
    else:
        sys.stdout.write("\n")


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one a line) or JSONL (a 'prompt' field a line); blank lines skipped."""
    import json

    from mlxft.errors import DataError

    try:
        lines = open(path, encoding="utf-8-sig").read().splitlines()  # a byte-order mark is not a prompt
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"cannot read prompts ({exc})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line).get("prompt")
            except (ValueError, AttributeError):
                value = None
            if not isinstance(value, str) or not value.strip():
                raise DataError(path, n, "expected a JSON object with a non-empty 'prompt' string")
            prompts.append(value)
        else:
            prompts.append(line)
    if not prompts:
        raise DataError(path, None, "no prompts")
    return prompts
