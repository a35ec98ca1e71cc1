"""Ollama Modelfile beside an exported GGUF: FROM, a TEMPLATE in Ollama's Go-template syntax that
renders the same turns as the chat template the run trained with (mlxft/templates.py), a
`PARAMETER stop` for every end-of-turn token, and the run's system prompt (or the one the
template inserts by default).

    ollama create my-model -f model.Modelfile
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.templates import ChatSetup, go_template, template_family


def quote(text: str) -> str:
    """A Modelfile string: triple-quoted when possible, else a JSON-escaped one-liner."""
    if '"""' not in text and not text.endswith('"') and not text.startswith('"'):
        return f'"""{text}"""'
    return json.dumps(text)


def modelfile_text(from_path: str, chat: ChatSetup, system: str | None,
                   adapter_path: str | None = None) -> tuple[str, str | None]:
    """(Modelfile text, its Go TEMPLATE or None when the chat template's family is not known)."""
    template = go_template(chat)
    lines = [f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if template:
        lines.append(f"TEMPLATE {quote(template)}")
    for stop in chat.stop_tokens:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if system:
        lines.append(f"SYSTEM {quote(system)}")
    return "\n".join(lines) + "\n", template


def modelfile_system(chat: ChatSetup, tokenizer=None) -> str | None:
    """The SYSTEM line: the run's system prompt, else the one the template inserts by itself."""
    if chat.system_prompt:
        return chat.system_prompt
    if tokenizer is not None and chat.source == "model":
        from mlxft.templates import default_system

        return default_system(tokenizer, chat.template)
    return None


def write_modelfile(gguf_path: Path, chat: ChatSetup, system: str | None, base_gguf: str | None = None) -> dict:
    """Write `<gguf stem>.Modelfile` beside `gguf_path`. For an adapter GGUF, `base_gguf` is
    the FROM and the adapter becomes ADAPTER."""
    from mlxft.atomic import atomic_file

    gguf_path = Path(gguf_path)
    target = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    if base_gguf:
        text, template = modelfile_text(base_gguf, chat, system, adapter_path=f"./{gguf_path.name}")
    else:
        text, template = modelfile_text(f"./{gguf_path.name}", chat, system)
    with atomic_file(target, "w") as fh:
        fh.write(text)
    return {"modelfile": str(target), "template": chat.family if template else None, "stops": chat.stop_tokens,
            "system": bool(system), "go_template": template}


__all__ = ["modelfile_text", "modelfile_system", "write_modelfile", "quote", "template_family"]
