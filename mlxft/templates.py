"""The chat template a run trains with, recorded in the run and carried into every export; and
the rules that go with it, kept here once: whether the tokenizer adds BOS (adds_bos), which
tokens end an assistant turn (stop_tokens), where generation stops (stop_ids), which tokens may
end a trained answer (answer_end_ids), and a prompt or conversation as token ids ready for
generation (format_prompt, format_messages).

A base model's own chat template is used when it has one. When it has none, mlxft uses its
family's known template where the vocabulary shows the family (the family's turn markers are
single tokens of the vocabulary), and says so in one line:

    gemma    <start_of_turn>user / model ... <end_of_turn>   (system text opens the first turn)
    llama3   <|start_header_id|>ROLE<|end_header_id|> ... <|eot_id|>
    chatml   <|im_start|>ROLE ... <|im_end|>                 (Qwen, SmolLM)
    phi3     <|ROLE|> ... <|end|>

Otherwise it uses the plain template (PLAIN below), and says so too:

    SYSTEM TEXT\\n\\n### User:\\nQUESTION\\n\\n### Assistant:\\nANSWER<eos>\\n\\n

Every fallback starts with the BOS token when the tokenizer adds one to plain text. The run
records the exact template, system prompt and stop tokens in RUN/chat_template.json; generate,
chat and export read it back, so what was trained is what runs. Each template has a twin in
Ollama's Go-template syntax for the Modelfile (see mlxft/export/ollama.py and the conformance
check in mlxft/export/selfcheck.py).
"""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD_FILE = "chat_template.json"

_GEMMA = ("{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
          "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
          "{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user')"
          " + '\\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
_LLAMA3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
           " + message['content'] + '<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
           " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
PLAIN = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
         "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
         "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")

# Ollama Go templates rendering the same turns (Ollama adds BOS itself when the GGUF says so).
# `.System` is every system message joined; `.Messages` still holds them (Ollama's collate).
GO_TEMPLATES = {
    "gemma": """{{- $first := true }}{{- range .Messages }}{{- if ne .Role "system" }}<start_of_turn>"""
             """{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}{{- end }}{{- end }}<start_of_turn>model
""",
    "llama3": """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    "chatml": """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
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
    "plain": """{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}### User:
{{ .Content }}

{{ else }}### Assistant:
{{ .Content }}EOS_TOKEN

{{ end }}{{ end }}### Assistant:
""",
}

# family -> (Jinja template, tokens that must be single tokens of the vocabulary)
FAMILIES = {
    "gemma": (_GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "llama3": (_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "chatml": (_CHATML, ("<|im_start|>", "<|im_end|>")),
    "phi3": (_PHI3, ("<|user|>", "<|assistant|>", "<|end|>")),
}
FAMILY_NAMES = {"gemma": "Gemma", "llama3": "Llama 3", "chatml": "ChatML (Qwen, SmolLM)", "phi3": "Phi-3"}

# How a model's own template shows its family (for the Modelfile's Go twin).
MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
           ("<|assistant|>", "phi3"), ("[INST]", "mistral"), ("### Assistant:", "plain"))


@dataclass
class ChatSetup:
    """The chat format a run trains with: what data.py renders, what export writes."""

    template: str
    source: str                       # "model" (the base's own), "family" or "plain" (mlxft's fallback)
    family: str | None                # gemma, llama3, chatml, phi3, mistral, plain; None: not recognised
    system_prompt: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    eos_token: str | None = None
    bos_token: str | None = None      # set when the tokenizer adds BOS to every text (runtimes add it too)

    def describe(self) -> str:
        if self.source == "family":
            return f"the base model has no chat template; using the {FAMILY_NAMES[self.family]} template"
        if self.source == "plain":
            return ("the base model has no chat template and its family is not recognised; using mlxft's plain "
                    "template (### User: / ### Assistant:, docs/export.md)")
        return "the base model's own chat template"


def template_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    for marker, family in MARKERS:
        if marker in chat_template:
            return family
    return None


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def vocabulary_family(tokenizer) -> str | None:
    """The known family whose turn markers are all single tokens of this vocabulary."""
    vocab = tokenizer.get_vocab()
    for family, (_, markers) in FAMILIES.items():
        if all(m in vocab and _single_token(tokenizer, m) for m in markers):
            return family
    return None


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with BOS: the one rule for training data, the chat
    templates and the export checks. Asked of its encoding rather than of `add_bos_token`, which
    some tokenizers (Gemma's in transformers 5) report as False while their post-processor adds
    BOS. Cached per tokenizer (data preparation asks once per sample)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    answer = tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] \
        and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]
    with contextlib.suppress(TypeError):
        _ADDS_BOS[tokenizer] = answer
    return answer


def stop_tokens(tokenizer, template: str) -> tuple[list[str], list[int]]:
    """Tokens that end an assistant turn: the first token after an assistant message in the
    rendered template when it is a special token, then EOS."""
    ids: list[int] = []
    try:
        text = render(tokenizer, template, [{"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "ANSWER"}])
        tail = text[text.rindex("ANSWER") + len("ANSWER"):]
        after = tokenizer.encode(tail, add_special_tokens=False)[:1]
        specials = set(tokenizer.all_special_ids) | {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if after and after[0] in specials:
            ids.append(after[0])
    except ValueError:
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tokenizer.convert_ids_to_tokens(ids), ids


def eos_ids(*values) -> set[int]:
    """Every end-of-sequence id named by `values` (each an id, a list of ids, or None), as the
    tokenizer, config.json and generation_config.json spell them."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _json_field(path: Path, key: str):
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def stop_ids(tokenizer, model_folder: Path | None = None, setup: "ChatSetup | None" = None, extra=()) -> set[int]:
    """Where generation stops, the one rule every backend uses: the caller's `extra` ids, the
    end-of-turn ids of the chat format in use (`setup.stop_ids`), and every EOS id that the
    tokenizer, the model folder's config.json and its generation_config.json name."""
    folder = Path(model_folder) if model_folder is not None else None
    return (set(extra or ()) | set(setup.stop_ids if setup is not None else ())
            | eos_ids(tokenizer.eos_token_id,
                      _json_field(folder / "config.json", "eos_token_id") if folder else None,
                      _json_field(folder / "generation_config.json", "eos_token_id") if folder else None))


def answer_end_ids(tokenizer) -> set[int]:
    """Tokens that may end a trained answer (for the data check's "never learns to stop"): EOS,
    the other special tokens except BOS and PAD, and the chat template's end-of-turn token, which
    some tokenizers do not list as special (Gemma's <end_of_turn>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids -= {tokenizer.bos_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        ids.update(stop_tokens(tokenizer, template)[1])
    return ids


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def choose(tokenizer, system_prompt: str | None = None) -> ChatSetup:
    """The base's own template, else its family's, else the plain template."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        template, source, family = own, "model", template_family(own)
    else:
        family = vocabulary_family(tokenizer)
        template = FAMILIES[family][0] if family else PLAIN
        source = "family" if family else "plain"
        family = family or "plain"
        if adds_bos(tokenizer) and tokenizer.bos_token:
            template = "{{ bos_token }}" + template
    stops, ids = stop_tokens(tokenizer, template)
    return ChatSetup(template, source, family, system_prompt, stops, ids, tokenizer.eos_token,
                     tokenizer.bos_token if adds_bos(tokenizer) else None)


def install(tokenizer, setup: ChatSetup) -> None:
    """Make the tokenizer render chats with `setup` (data.py and inference use tokenizer's own)."""
    tokenizer.chat_template = setup.template


def record(run_dir: Path, setup: ChatSetup) -> Path:
    from mlxft.atomic import atomic_file

    path = Path(run_dir) / RECORD_FILE
    with atomic_file(path, "w") as fh:
        json.dump(asdict(setup), fh, indent=2)
    return path


def recorded(run_dir: Path | None) -> ChatSetup | None:
    """The setup a run trained with, or None for runs made before it was recorded."""
    if run_dir is None:
        return None
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    from mlxft.errors import ModelError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ChatSetup(**data)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable chat template record ({exc})") from None


def for_training(tokenizer, system_prompt: str | None, run_dir: Path | None = None) -> ChatSetup:
    """Choose (or, resuming, read back) the run's chat setup, install it on the tokenizer and say
    in one line when it is not the base model's own."""
    setup = recorded(run_dir) or choose(tokenizer, system_prompt)
    install(tokenizer, setup)
    if setup.source != "model":
        from mlxft import ui

        ui.info(f"chat template: {setup.describe()}")
    return setup


def for_inference(tokenizer, run_dir: Path | None) -> ChatSetup | None:
    """A run's recorded setup installed on `tokenizer` (None for a plain model or an older run:
    the tokenizer is left as it is)."""
    setup = recorded(run_dir)
    if setup is not None:
        install(tokenizer, setup)
    return setup


def go_template(setup: ChatSetup) -> str | None:
    """The Modelfile TEMPLATE for `setup`, or None when its family is not known."""
    tpl = GO_TEMPLATES.get(setup.family or "")
    if tpl is None:
        return None
    return tpl.replace("EOS_TOKEN", setup.eos_token or "")


def default_system(tokenizer, template: str) -> str | None:
    """The system prompt a template inserts when a conversation has none (SmolLM2's does), found
    by rendering with and without a system message; a Modelfile must then carry it as SYSTEM."""
    marker = "\x00SYSTEM\x00"
    user = {"role": "user", "content": "Q"}
    try:
        bare = render(tokenizer, template, [user])
        with_system = render(tokenizer, template, [{"role": "system", "content": marker}, user])
    except Exception:
        return None
    if marker not in with_system:
        return None
    prefix, suffix = with_system.split(marker, 1)
    if bare.startswith(prefix) and bare.endswith(suffix) and len(bare) > len(prefix) + len(suffix):
        return bare[len(prefix):len(bare) - len(suffix)]
    return None


# ---------------------------------------------------------------------------- prompts for generation


def format_prompt(tokenizer, prompt: str, raw: bool = False, system: str | None = None,
                  history: list[dict] | None = None) -> list[int]:
    if raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)
    return format_messages(tokenizer, [*(history or []), {"role": "user", "content": prompt}], system)


def format_messages(tokenizer, messages: list[dict], system: str | None = None) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the assistant's turn;
    `system` goes first unless the conversation starts with its own system message. Without a
    chat template, the last message's text as a raw prompt (as format_prompt does)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"])
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
