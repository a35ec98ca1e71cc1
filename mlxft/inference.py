"""Loading a model (or a run's base plus adapter) for inference, and prompt formatting."""

from __future__ import annotations

from mlxft.config import Config


def load_for_inference(model_spec: str | None, backend: str = "auto", adapter: str = "best",
                       trust_remote_code: bool = False, seed: int = 0):
    """Return (backend instance, ResolvedModel) ready to generate or evaluate. The backend seeds
    its framework's RNG with `seed` as it loads, so sampled generations repeat per seed."""
    from mlxft.backends.select import choose_backend, make_backend
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_spec, adapter=adapter)
    name, _ = choose_backend(backend)
    cfg = Config()
    cfg.seed = seed
    cfg.train.dtype = "float32" if name == "torch" else "auto"
    engine = make_backend(name, cfg)
    engine.trust_remote_code = trust_remote_code
    engine.load(resolved.path, adapter=resolved.adapter, train=False)
    from mlxft.templates import for_inference

    engine.chat_setup = for_inference(engine.tokenizer, resolved.run)  # the template a run trained with
    return engine, resolved


def run_system_prompt(resolved) -> str | None:
    """The system prompt a run was trained with, so inference matches training."""
    if resolved.run is None:
        return None
    from mlxft.config import build_config

    try:
        return build_config(str(resolved.run / "config.yaml")).data.system_prompt
    except Exception:
        return None


def run_stop_ids(engine) -> list[int]:
    """The end-of-turn ids the run trained with (its recorded chat template), beside EOS."""
    setup = getattr(engine, "chat_setup", None)
    return list(setup.stop_ids) if setup is not None else []


def format_prompt(tokenizer, prompt: str, raw: bool = False, system: str | None = None,
                  history: list[dict] | None = None) -> list[int]:
    if raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend(history or [])
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TokenPrinter:
    """Decode streamed token ids incrementally (multi-byte characters split across tokens)."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.shown:])
        self.shown = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
