"""The HTTP side of `mlxft serve` on Starlette: /v1/models, /v1/chat/completions and
/v1/completions (JSON or server-sent events), an optional bearer API key, OpenAI-style errors,
and cancellation of a generation whose client has gone away."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxft.serve.engine import Engine
from mlxft.serve.protocol import APIError, chunk, completion, finish, new_id, parse, usage
from mlxft.serve.scheduler import QueueFull


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _watch_disconnect(request: Request, cancelled: threading.Event, engine: Engine) -> None:
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            engine.scheduler.wake()
            return
        await asyncio.sleep(0.1)


def _submit(engine: Engine, *args):
    try:
        return engine.submit(*args)
    except QueueFull as exc:
        raise APIError(429, f"The server is busy: {exc}", kind="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None


def _raise_unfinished(gen) -> None:
    """A generation that ended on the server's limits, not on its own, is an error."""
    if gen.finish_reason == "timeout":
        raise APIError(504, "The request timed out (the server's --timeout)", kind="timeout", code="timeout")
    if gen.finish_reason == "memory":
        raise APIError(503, "Not enough free memory for this request's KV cache; lower max_tokens or retry",
                       kind="server_error", code="insufficient_memory")


def _lifespan(engine: Engine):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    return lifespan


def create_app(engine: Engine, api_key: str | None = None) -> Starlette:
    tokenizer = engine.tokenizer

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def model_card(m) -> dict:
        return {"id": m.id, "object": "model", "created": m.created, "owned_by": "mlxft"}

    async def list_models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card(m) for m in engine.models.values()]})

    async def get_model(request: Request):
        check_key(request)
        name = request.path_params["name"]
        model = engine.find(name)
        if model is None:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return JSONResponse(model_card(model))

    async def health(request: Request):
        scheduler = engine.scheduler
        return JSONResponse({"status": "ok", "models": list(engine.models),
                             "batching": {"max_batch": scheduler.max_batch, "max_queue": scheduler.max_queue,
                                          **scheduler.stats, **scheduler.decoder.stats}})

    async def complete(request: Request, chat: bool):
        from mlxft.inference import format_messages, format_prompt

        check_key(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        req = parse(body, chat)
        model = engine.find(req.model)
        if model is None:
            raise APIError(404, f"The model '{req.model}' does not exist", "model", "model_not_found")
        if chat:
            engine.use_template(model)
            ids = format_messages(tokenizer, req.messages, model.system)
        else:
            ids = format_prompt(tokenizer, req.prompt, raw=True)
        limit, n = engine.context, len(ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
        if n >= limit or (req.max_tokens is not None and n + req.max_tokens > limit):
            asked = f" plus {req.max_tokens} completion tokens" if req.max_tokens is not None else ""
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the request has {n} "
                                f"prompt tokens{asked}. Shorten the prompt or lower max_tokens.",
                           "messages" if chat else "prompt", "context_length_exceeded")
        max_tokens = req.max_tokens or (limit - n)
        rid = new_id(chat)
        args = (model, ids, max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        if not req.stream:
            future, cancelled = _submit(engine, *args)
            watcher = asyncio.create_task(_watch_disconnect(request, cancelled, engine))
            try:
                gen = await asyncio.wrap_future(future)
            except Exception as exc:  # the model failed: answered as an APIError (a plain exception
                # reaches Starlette's last-resort handler, which re-raises and may reset the connection)
                raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error") from None
            finally:
                cancelled.set()
                watcher.cancel()
            if gen.finish_reason == "cancelled":
                return Response(status_code=499)  # nobody is listening any more
            _raise_unfinished(gen)
            return JSONResponse(completion(chat, rid, model.id, gen))

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))

        future, cancelled = _submit(engine, *args, on_text)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("done", f)))

        async def events():
            try:
                if chat:
                    yield _sse(chunk(chat, rid, model.id, first=True))
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield _sse(chunk(chat, rid, model.id, text=value))
                        continue
                    try:
                        gen = value.result()
                        _raise_unfinished(gen)
                    except APIError as exc:
                        yield _sse(exc.body())
                        return
                    except Exception as exc:
                        yield _sse(APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                            kind="server_error").body())
                        return
                    yield _sse(chunk(chat, rid, model.id, finish_reason=finish(gen.finish_reason)))
                    if req.include_usage:
                        yield _sse(chunk(chat, rid, model.id,
                                         usage_block=usage(gen.prompt_tokens, gen.completion_tokens)))
                    yield _sse("[DONE]")
                    return
            finally:
                cancelled.set()  # the client went away (or we are done): the row leaves the batch
                engine.scheduler.wake()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        body = APIError(500, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                       Exception: server_error},
                    lifespan=_lifespan(engine))
    app.state.engine = engine
    return app
