"""`mlxft serve`: an OpenAI-compatible local HTTP server for a model, or for several runs of one
base model side by side (the request's `model` picks the adapter; the base is loaded once)."""

from __future__ import annotations

import click

from mlxft.commands.options import adapter_option, backend_option, trust_remote_code_option, weights_option


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    import socket

    from mlxft.errors import MlxftError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MlxftError(f"--host {host}: cannot be resolved ({exc.strerror or exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise MlxftError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


@click.command()
@click.argument("models", nargs=-1, metavar="[MODEL_OR_RUN]...")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine can connect).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="MLXFT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (also $MLXFT_API_KEY).")
@backend_option()
@adapter_option("Which adapter of each run to serve: the best by validation, or the last saved.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Requests decoded side by side (default: what fits in half the free memory at full "
                   "context, at most 16). Requests beyond it wait in order of arrival.")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Requests allowed to wait; beyond it the server answers 429 with Retry-After.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds a request may take, waiting included, before it is ended (504).")
@click.option("--prompt-cache-mb", type=click.IntRange(0, 1 << 20), default=512, show_default=True,
              help="Memory for KV caches of earlier prompts, reused for a shared prefix (0: off).")
@weights_option(extra="Several runs served at once keep float32 (their adapters are switched, not merged).")
@trust_remote_code_option()
def serve(models, host, port, api_key, backend, adapter, max_batch, max_queue, timeout, prompt_cache_mb,
          weights, trust_remote_code):
    """Serve MODEL_OR_RUN (default: the built-in SmolLM2-135M-Instruct) over the OpenAI API:
    /v1/models, /v1/chat/completions and /v1/completions, streamed or not.

    Several runs of the same base model (or mlx-lm adapter folders) can be served at once: each
    is a model named after its folder, and the base is loaded once. Chat requests use the
    model's chat template and the run's system prompt, as `mlxft chat` and `generate` do.
    Requests are batched as they come (continuous batching): each joins the running batch at
    the next token and leaves it when done; runs with different adapters take turns.

    \b
    Examples:
      mlxft serve runs/quickstart
      mlxft serve runs/support runs/faq --port 8000 --api-key secret
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "quickstart", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from mlxft import ui
    from mlxft.backends.select import module_available
    from mlxft.errors import MlxftError

    if not (module_available("starlette") and module_available("uvicorn")):
        raise MlxftError("mlxft serve needs starlette and uvicorn", "pip install 'mlxft[serve]'")
    if not _loopback(host) and not api_key:
        ui.warn(f"--host {host}: listening beyond this machine without --api-key; anyone who can reach "
                "it can use the model")
    _check_port_free(host, port)

    import uvicorn

    from mlxft.serve.app import create_app
    from mlxft.inference import weights_note
    from mlxft.serve.engine import Engine

    with ui.console.status("Loading model"):
        engine = Engine(list(models), backend=backend, adapter=adapter, trust_remote_code=trust_remote_code,
                        max_batch=max_batch, max_queue=max_queue, timeout=timeout, prompt_cache_mb=prompt_cache_mb,
                        weights=weights)
    shown = f"[{host}]" if ":" in host else host
    ui.info(f"[bold]mlxft serve[/bold] {engine.base.path.name} on {engine.backend.name} "
            f"(context {engine.context}, batch up to {engine.max_batch}{weights_note(engine.backend)}): "
            f"models {', '.join(engine.models)}")
    ui.info(f"OpenAI base URL: http://{shown}:{port}/v1" + ("  (API key required)" if api_key else "")
            + "  Ctrl-C stops.")
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
