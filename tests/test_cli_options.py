"""Command-line options mean one thing everywhere: no short flag names two options, shared options
carry one spelling, --out / --quantize are still accepted, and every command that loads a model
takes --trust-remote-code."""

from __future__ import annotations

import click
import pytest

from mlxft.cli import COMMANDS, cli


def all_commands() -> dict[str, click.Command]:
    out = {}
    for name in COMMANDS:
        command = cli.get_command(None, name)
        if isinstance(command, click.Group):
            out.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            out[name] = command
    return out


def test_no_short_flag_names_two_options():
    meaning: dict[str, set[str]] = {}
    for command in all_commands().values():
        for param in command.params:
            if isinstance(param, click.Option):
                longs = [o for o in param.opts if o.startswith("--")]  # the first is its name
                for short in (o for o in param.opts if not o.startswith("--")):
                    meaning.setdefault(short, set()).add(longs[0])
    assert {s: m for s, m in meaning.items() if len(m) > 1} == {}
    assert meaning["-o"] == {"--output"} and meaning["-p"] == {"--prompt"} and meaning["-q"] == {"--quant"}


def test_shared_options_have_one_spelling_and_one_help():
    seen: dict[str, set[tuple]] = {}
    for command in all_commands().values():
        for param in command.params:
            if isinstance(param, click.Option) and param.name in ("backend", "trust_remote_code", "skip_bad_lines"):
                seen.setdefault(param.name, set()).add(tuple(param.opts))
    assert seen == {"backend": {("--backend", "-b")}, "trust_remote_code": {("--trust-remote-code",)},
                    "skip_bad_lines": {("--skip-bad-lines",)}}


@pytest.mark.parametrize("name", ["train", "generate", "chat", "eval", "export", "serve", "data check"])
def test_every_command_that_loads_a_model_takes_trust_remote_code(name):
    assert "trust_remote_code" in {p.name for p in all_commands()[name].params}


@pytest.mark.parametrize("name, args, param, value", [
    ("train", ["--out", "r1"], "out", "r1"),
    ("train", ["--output", "r2"], "out", "r2"),
    ("train", ["-o", "r3"], "out", "r3"),
    ("fuse", ["RUN", "--output", "d"], "output", "d"),
    ("fuse", ["RUN", "-o", "d", "--quantize", "4"], "quantize_bits", "4"),
    ("fuse", ["RUN", "-o", "d", "--quant", "8"], "quantize_bits", "8"),
    ("export", ["RUN", "--out", "m.gguf"], "output", "m.gguf"),
])
def test_aliases_parse_to_the_same_option(name, args, param, value):
    ctx = all_commands()[name].make_context(name, list(args))
    assert ctx.params[param] == value


@pytest.mark.parametrize("name", ["train", "eval", "data check"])
def test_data_help_names_every_accepted_format(name):
    from click.testing import CliRunner

    text = " ".join(CliRunner().invoke(cli, [*name.split(), "--help"]).output.split())
    assert "Parquet" in text and "hf:NAME" in text
