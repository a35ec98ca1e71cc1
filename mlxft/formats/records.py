"""One training record, whatever shape it arrives in, checked and rewritten into one of the three
shapes the tokenizer knows: chat (`messages`, optionally with `tools`), completions
(`prompt`/`completion`) or text (`text`).

Shapes recognised per record:
    chat        {"messages": [{"role", "content"}, ...]}            roles system/user/assistant/tool
    tools       chat plus "tools": [...], assistant "tool_calls", "tool" role messages
    sharegpt    {"conversations": [{"from", "value"}, ...], "tools"?}  from human/gpt/system/tool
                (LLaMA-Factory's function_call (value: {"name", "arguments"} as JSON) and
                observation are read as an assistant tool call and a tool result)
    alpaca      {"instruction", "input"?, "output", "system"?}
    completions {"prompt", "completion"}
    text        {"text"}
    preference  {"prompt"?, "chosen", "rejected"}: TRL's preference format, as strings or as
                lists of messages (without "prompt", the messages chosen and rejected share
                are the prompt); read by mlxft/formats/pairs.py
`data.columns` renames source fields to these names first ({"prompt": "question", ...}); only
the mapped fields are read then (map `system` too to keep it). A source already in one of the
shapes above, naming none of the mapped columns, is read as it is (see needs_mapping).
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}
# Field names a column mapping may target (the left side of data.columns).
FIELDS = ("messages", "tools", "conversations", "instruction", "input", "output", "system",
          "prompt", "completion", "text", "chosen", "rejected")
CANONICAL = {"chat": "chat", "tools": "chat", "sharegpt": "chat", "alpaca": "chat",
             "completions": "completions", "text": "text", "preference": "preference"}


class RowError(Exception):
    """A record that cannot be used; the reader adds the file and line or row."""


def rename_columns(record: dict, columns: dict[str, str] | None) -> dict:
    """Apply data.columns ({target field: source column}). A file that already names the field
    (a validation JSONL beside a mapped CSV) keeps it; a column found under neither name is an error."""
    if not columns:
        return record
    out = {}
    for target, source in columns.items():
        if source in record:
            out[target] = record[source]
        elif target in record:
            out[target] = record[target]
        else:
            raise RowError(f"no column '{source}' (data.columns.{target}); columns here: "
                           f"{', '.join(map(str, record)) or 'none'}")
    return out


def needs_mapping(record: dict, columns: dict[str, str]) -> bool:
    """Whether data.columns applies to a source whose first row is `record`: it does unless the
    row names none of the mapped source columns and is already in a known shape (a validation
    JSONL in chat format beside a mapped CSV)."""
    if any(source in record for source in columns.values()):
        return True
    try:
        detect_shape(record)
    except RowError:
        return True  # the mapping's own error names the missing column
    return False


def detect_shape(record) -> str:
    if not isinstance(record, dict):
        raise RowError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "tools" if _uses_tools(record) else "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise RowError(f"unknown format (keys: {keys}); expected 'messages', 'conversations', "
                   "'instruction'/'output', 'prompt'/'completion' or 'text' (or map columns with data.columns)")


def _uses_tools(record: dict) -> bool:
    messages = record.get("messages")
    if record.get("tools"):
        return True
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"'{name}' is empty")
    return value


def _maybe_json(value, name: str):
    """Spreadsheet and Parquet cells hold lists as JSON text; decode those."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"'{name}' is text but not valid JSON ({exc.msg} at column {exc.colno})") from None
    return value


def _tool_calls(calls, where: str) -> list[dict]:
    calls = _maybe_json(calls, f"{where}.tool_calls")
    if not isinstance(calls, list) or not calls:
        raise RowError(f"'{where}.tool_calls' must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"'{where}.tool_calls[{j}]' needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI logs store arguments as JSON text; templates want an object
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RowError(f"'{where}.tool_calls[{j}].arguments' is not valid JSON") from None
        if not isinstance(args, dict):
            raise RowError(f"'{where}.tool_calls[{j}].arguments' must be an object")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(messages, name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{name}' must be a non-empty list")
    out, has_assistant = [], False
    for i, msg in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(f"{where} must be an object")
        if "role" not in msg:
            raise RowError(f"{where} has no 'role'")
        role = msg["role"]
        if role not in ROLES:
            raise RowError(f"{where} has unknown role {role!r} (expected {', '.join(ROLES)})")
        clean = {"role": role}
        if role == "assistant" and msg.get("tool_calls"):
            clean["content"] = msg.get("content") or ""
            if not isinstance(clean["content"], str):
                raise RowError(f"'{where}.content' must be a string")
            clean["tool_calls"] = _tool_calls(msg["tool_calls"], where)
        else:
            if "content" not in msg:
                raise RowError(f"{where} has no 'content'")
            clean["content"] = _text(msg["content"], f"{where}.content")
        if role == "tool" and msg.get("name"):
            clean["name"] = str(msg["name"])
        if role == "tool" and msg.get("tool_call_id"):
            clean["tool_call_id"] = str(msg["tool_call_id"])
        has_assistant |= role == "assistant"
        out.append(clean)
    if not has_assistant:
        raise RowError("conversation has no assistant turn to learn from")
    return out


def _tools(record: dict, messages: list[dict]) -> dict:
    out = {"messages": messages}
    if record.get("tools"):
        tools = _maybe_json(record["tools"], "tools")
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowError("'tools' must be a list of tool definitions (objects)")
        out["tools"] = tools
    return out


def to_canonical(record, shape: str) -> dict:
    """Check a record of `shape` and return it as chat, completions, text or preference."""
    if shape == "preference":
        from mlxft.formats.pairs import to_pair

        return to_pair(record)
    if shape in ("chat", "tools"):
        return _tools(record, _messages(_maybe_json(record["messages"], "messages"), "messages"))
    if shape == "sharegpt":
        turns = _maybe_json(record["conversations"], "conversations")
        if not isinstance(turns, list) or not turns:
            raise RowError("'conversations' must be a non-empty list")
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _text(record["system"], "system")})
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise RowError(f"conversations[{i}] has unknown 'from' {turn['from']!r} "
                               f"(expected {', '.join(SHAREGPT_ROLES)})")
            if turn["from"] == "function_call":
                calls = _maybe_json(turn["value"], f"conversations[{i}].value")
                messages.append({"role": "assistant", "content": "",
                                 "tool_calls": calls if isinstance(calls, list) else [calls]})
            else:
                messages.append({"role": role, "content": turn["value"]})
        return _tools(record, _messages(messages, "conversations"))
    if shape == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                raise RowError(f"missing field '{key}'")
        user = _text(record["instruction"], "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(record["output"], "output")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
        return {"messages": messages}
    if shape == "completions":
        for key in ("prompt", "completion"):
            if key not in record:
                raise RowError(f"missing field '{key}'")
        return {"prompt": _text(record["prompt"], "prompt"), "completion": _text(record["completion"], "completion")}
    return {"text": _text(record["text"], "text")}
