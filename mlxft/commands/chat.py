"""`mlxft chat`: an interactive terminal chat with a model, a run, or a GGUF file (through
llama.cpp when llama-cpp-python is installed), streaming tokens as they come."""

from __future__ import annotations

import click

from mlxft.commands.options import adapter_option, backend_option, trust_remote_code_option, weights_option

HELP_LINE = "Type a message and press Enter. /reset clears the conversation, /exit (or Ctrl-D) quits."


class _BackendChat:
    """A conversation on an mlxft backend (torch or mlx): the model's chat template, history
    trimmed from the oldest turn when it would not fit the context."""

    def __init__(self, engine, system, max_tokens, temperature, top_p, context):
        self.engine, self.system = engine, system
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.context = context

    def reply(self, history: list[dict], message: str, write) -> str:
        from mlxft.inference import TokenPrinter, format_prompt, run_stop_ids

        tok = self.engine.tokenizer
        while True:
            ids = format_prompt(tok, message, system=self.system, history=history)
            if len(ids) + self.max_tokens <= self.context or not history:
                break
            history = history[2:]  # drop the oldest exchange
        printer = TokenPrinter(tok, write)
        self.engine.generate(ids, self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                             on_token=printer, stop_ids=run_stop_ids(self.engine))
        return printer.text()


class _LlamaCppChat:
    """A conversation on llama.cpp (llama-cpp-python), with the GGUF's own chat template."""

    def __init__(self, path, system, max_tokens, temperature, top_p, n_ctx, seed):
        from mlxft.export.selfcheck import load_llama

        self.llm = load_llama(path, n_ctx=n_ctx, seed=seed, verbose=False)
        self.system, self.max_tokens = system, max_tokens
        self.temperature, self.top_p = temperature, top_p

    def reply(self, history: list[dict], message: str, write) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        messages.append({"role": "user", "content": message})
        parts = []
        stream = self.llm.create_chat_completion(messages=messages, stream=True, max_tokens=self.max_tokens,
                                                 temperature=self.temperature, top_p=self.top_p)
        for chunk in stream:
            text = chunk["choices"][0].get("delta", {}).get("content")
            if text:
                parts.append(text)
                write(text)
        return "".join(parts)


def _use_llama_cpp(model_or_run, engine_choice) -> bool:
    from pathlib import Path

    from mlxft.backends.select import module_available
    from mlxft.errors import MlxftError

    is_gguf = bool(model_or_run) and Path(model_or_run).suffix.lower() == ".gguf"
    if engine_choice == "llama.cpp":
        if not is_gguf:
            raise MlxftError("--engine llama.cpp: needs a .gguf file", "export one with `mlxft export RUN -o model.gguf`")
        if not module_available("llama_cpp"):
            raise MlxftError("--engine llama.cpp: llama-cpp-python is not installed", "pip install 'mlxft[llamacpp]'")
        return True
    return engine_choice == "auto" and is_gguf and module_available("llama_cpp")


@click.command()
@click.argument("model_or_run", required=False)
@click.option("--system", "-s", help="System prompt (default: the run's, if it set one).")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1, 100000),
              help="Most tokens per answer.")
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0, 10), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@backend_option()
@adapter_option()
@click.option("--engine", type=click.Choice(["auto", "llama.cpp", "backend"]), default="auto", show_default=True,
              help="For a .gguf file: llama.cpp when installed (auto), or import it for --backend.")
@click.option("--ctx", "n_ctx", default=2048, show_default=True, type=click.IntRange(64, 1_000_000),
              help="Context length; the oldest turns are dropped when the conversation outgrows it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for sampling (--temperature > 0): the same seed gives the same answer.")
@weights_option()
@trust_remote_code_option()
def chat(model_or_run, system, max_tokens, temperature, top_p, backend, adapter, engine, n_ctx, seed,
         weights, trust_remote_code):
    """Chat with MODEL_OR_RUN in the terminal (default: the built-in SmolLM2-135M-Instruct).

    A run directory means its base model plus its best adapter; a .gguf file runs through
    llama.cpp when llama-cpp-python is installed. Answers stream as they are generated, using
    the model's chat template.

    \b
    In the chat:
      /reset    forget the conversation so far
      /exit     quit (also /quit, Ctrl-D)
      Ctrl-C    stop the current answer (at the prompt: quit)
    """
    import sys

    from mlxft import ui

    if _use_llama_cpp(model_or_run, engine):
        with ui.console.status("Loading GGUF with llama.cpp"):
            session = _LlamaCppChat(model_or_run, system, max_tokens, temperature, top_p, n_ctx, seed)
        label = f"{model_or_run} (llama.cpp)"
    else:
        from mlxft.inference import load_for_inference, run_system_prompt, weights_note

        with ui.console.status("Loading model"):
            loaded, resolved = load_for_inference(model_or_run, backend, adapter, trust_remote_code, seed=seed,
                                                  weights=weights)
        if system is None:
            system = run_system_prompt(resolved)
        context = n_ctx
        from mlxft.inference import model_context

        limit = model_context(resolved.path)
        if limit:
            context = min(context, limit)
        session = _BackendChat(loaded, system, max_tokens, temperature, top_p, context)
        adapter_note = f", adapter {adapter}" if resolved.adapter else ""
        label = f"{resolved.spec} ({loaded.name}{adapter_note}{weights_note(loaded)})"

    interactive = sys.stdin.isatty()
    ui.info(f"[bold]mlxft chat[/bold] {label}")
    if interactive:
        ui.info(HELP_LINE)
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    history: list[dict] = []
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                write("\n")
            break
        except KeyboardInterrupt:
            write("\n")
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit", "/bye"):
            break
        if message == "/reset":
            history = []
            ui.info("(conversation cleared)")
            continue
        if message.startswith("/") and message.split()[0] in ("/help", "/?"):
            ui.info(HELP_LINE)
            continue
        try:
            answer = session.reply(history, message, write)
        except KeyboardInterrupt:
            write("\n")
            ui.info("(answer stopped)")
            continue
        write("\n")
        history = history + [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]

