"""The OpenAI API's request checks and response shapes for `mlxft serve`: chat.completion(s),
text_completion, their streamed chunks, and OpenAI-style error bodies."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    model: str
    messages: list[dict] | None    # chat
    prompt: str | None             # completions
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


ROLES = ("system", "user", "assistant", "developer")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{key}' must be a number from {low:g} to {high:g}, not {value!r}", key, "invalid_value")
    return float(value)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse(body, chat: bool) -> Request:
    """Check a request body; raises APIError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (a name from /v1/models)", "model", "missing_required_parameter")
    messages = prompt = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise APIError(400, f"messages[{i}]: needs a role ({', '.join(ROLES)})", f"messages[{i}].role")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _content(m, i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "'n' must be 1 (one completion per request)", "n", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(400, f"'max_tokens' must be a positive integer, not {max_tokens!r}", "max_tokens", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, not {seed!r}", "seed", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream", "invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_value")
    return Request(model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stop, seed=seed, stream=stream,
                   include_usage=bool(options.get("include_usage")))


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion(chat: bool, rid: str, model: str, gen) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                  "finish_reason": finish(gen.finish_reason), "logprobs": None}
    else:
        choice = {"index": 0, "text": gen.text, "finish_reason": finish(gen.finish_reason), "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(gen.prompt_tokens, gen.completion_tokens)}


def chunk(chat: bool, rid: str, model: str, text: str | None = None, finish_reason: str | None = None,
          first: bool = False, usage_block: dict | None = None) -> dict:
    if usage_block is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if usage_block is not None:
        out["usage"] = usage_block
    return out
