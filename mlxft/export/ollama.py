"""Ollama Modelfile beside an exported GGUF: FROM, a TEMPLATE (Go template syntax) converted
from the model's chat template for the families mlxft knows, stop parameters from the
EOS/end-of-turn tokens, and the run's system prompt.

    ollama create my-model -f model.Modelfile
"""

from __future__ import annotations

import json
from pathlib import Path

# Go templates in the `.Messages` form Ollama documents; Ollama prepends SYSTEM as a system
# message, so templates that render system messages get it for free.
TEMPLATES = {
    "chatml": """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""",
    "llama3": """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    "gemma": """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
""",
    "phi3": """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
""",
    "mistral": """{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}""",
}

MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
           ("<|assistant|>", "phi3"), ("[INST]", "mistral"))


def template_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    for marker, family in MARKERS:
        if marker in chat_template:
            return family
    return None


def quote(text: str) -> str:
    """A Modelfile string: triple-quoted when possible, else a JSON-escaped one-liner."""
    if '"""' not in text and not text.endswith('"'):
        return f'"""{text}"""'
    return json.dumps(text)


def modelfile_text(from_path: str, chat_template: str | None, stops: list[str], system: str | None,
                   adapter_path: str | None = None) -> tuple[str, str | None]:
    """(Modelfile text, template family or None when the chat template is not recognised)."""
    family = template_family(chat_template)
    lines = [f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if family:
        lines.append(f"TEMPLATE {quote(TEMPLATES[family])}")
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if system:
        lines.append(f"SYSTEM {quote(system)}")
    return "\n".join(lines) + "\n", family


def write_modelfile(gguf_path: Path, vocab, system: str | None, base_gguf: str | None = None) -> dict:
    """Write `<gguf stem>.Modelfile` beside `gguf_path`. For an adapter GGUF, `base_gguf` is
    the FROM and the adapter becomes ADAPTER."""
    from mlxft.atomic import atomic_file

    gguf_path = Path(gguf_path)
    target = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    if base_gguf:
        text, family = modelfile_text(base_gguf, vocab.chat_template, vocab.stop_tokens(), system,
                                      adapter_path=f"./{gguf_path.name}")
    else:
        text, family = modelfile_text(f"./{gguf_path.name}", vocab.chat_template, vocab.stop_tokens(), system)
    with atomic_file(target, "w") as fh:
        fh.write(text)
    return {"modelfile": str(target), "template": family, "stops": vocab.stop_tokens(), "system": bool(system)}
