"""One preference record in any of TRL's layouts, checked and rewritten as a canonical pair:

    {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}

Accepted (TRL's "standard" and "conversational" preference formats, explicit or implicit prompt):
    {"prompt": "text", "chosen": "text", "rejected": "text"}
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    {"chosen": [messages], "rejected": [messages]}   the shared leading messages are the prompt
A string prompt becomes one user message and a string answer one assistant message, so every
pair is rendered by the model's chat template, as SFT data is.
"""

from __future__ import annotations

from mlxft.formats.records import RowError, _maybe_json, _messages, _text


def _as_messages(value, name: str, role: str) -> list[dict]:
    value = _maybe_json(value, name) if isinstance(value, str) and value.lstrip().startswith("[") else value
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, name)}]
    if not isinstance(value, list) or not value:
        raise RowError(f"'{name}' must be a non-empty string or list of messages")
    return value


def _shared_prefix(chosen: list, rejected: list) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def to_pair(record: dict) -> dict:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RowError(f"missing field '{key}' (a preference pair needs 'chosen' and 'rejected')")
    chosen = _as_messages(record["chosen"], "chosen", "assistant")
    rejected = _as_messages(record["rejected"], "rejected", "assistant")
    if "prompt" in record and record["prompt"] is not None:
        prompt = _as_messages(record["prompt"], "prompt", "user")
    else:
        n = _shared_prefix(chosen, rejected)
        if n == 0:
            raise RowError("missing field 'prompt' and 'chosen'/'rejected' share no leading messages to use as one")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen or not rejected:
            raise RowError("'chosen' and 'rejected' are the same conversation")
    # Checked as whole conversations (roles, contents); the answers must be assistant turns.
    checked = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        whole = _messages(prompt + answer, name)
        if whole[len(prompt)]["role"] != "assistant":
            raise RowError(f"'{name}' must start with an assistant message")
        checked[name] = whole
    n = len(prompt)
    if checked["chosen"][n - 1]["role"] == "assistant":
        raise RowError("'prompt' must end with a user (or tool) message, not an assistant one")
    return {"prompt": checked["chosen"][:n], "chosen": checked["chosen"][n:], "rejected": checked["rejected"][n:]}
