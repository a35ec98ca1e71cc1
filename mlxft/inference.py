"""Loading a model (or a run's base plus adapter) for inference, and prompt formatting."""

from __future__ import annotations

from mlxft.config import Config
from mlxft.templates import format_messages, format_prompt  # noqa: F401 (the names generate, chat and serve use)


def load_for_inference(model_spec: str | None, backend: str = "auto", adapter: str = "best",
                       trust_remote_code: bool = False, seed: int = 0, weights: str = "float32"):
    """Return (backend instance, ResolvedModel) ready to generate or evaluate. The backend seeds
    its framework's RNG with `seed` as it loads, so sampled generations repeat per seed."""
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_spec, adapter=adapter)
    engine = load_backend(resolved.path, resolved.adapter, backend, trust_remote_code, seed, weights)
    from mlxft.templates import for_inference

    engine.chat_setup = for_inference(engine.tokenizer, resolved.run)  # the template a run trained with
    return engine, resolved


def load_backend(model_path, adapter=None, backend: str = "auto", trust_remote_code: bool = False,
                 seed: int = 0, weights: str = "float32"):
    """A backend with the model at `model_path` (plus `adapter`) loaded for inference. `weights`:
    on PyTorch on a CPU, the dtype the Linear weights are kept in for generation (auto, float32,
    bfloat16, float16; auto is measured: mlxft.decode.weights). Scoring and checks keep the
    float32 default. MLX ignores it."""
    from mlxft.backends.select import choose_backend, make_backend

    name, _ = choose_backend(backend)
    cfg = Config()
    cfg.seed = seed
    cfg.train.dtype = "float32" if name == "torch" else "auto"
    engine = make_backend(name, cfg)
    engine.trust_remote_code = trust_remote_code
    if name == "torch":
        engine.inference_weights = weights
    engine.load(model_path, adapter=adapter, train=False)
    return engine


def weights_note(backend) -> str:
    """', bfloat16 weights (auto: ...)' when generation does not run on the float32 weights, and
    ', packed weights for batches (...)' when batched steps use mlxft.decode.packed."""
    dtype = getattr(backend, "weights_dtype", "float32")
    note = "" if dtype == "float32" else f", {dtype} weights ({backend.weights_reason})"
    if getattr(backend, "packed", False):
        note += f", packed weights for batches (auto: {backend.packed_reason})"
    return note


def model_context(path) -> int | None:
    """The context length in the model's config.json (max_position_embeddings), if it says."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def run_system_prompt(resolved) -> str | None:
    """The system prompt a run was trained with, so inference matches training."""
    if resolved.run is None:
        return None
    from mlxft.runs import Run

    try:
        return Run(resolved.run).config().data.system_prompt
    except Exception:
        return None


def run_stop_ids(engine) -> list[int]:
    """The end-of-turn ids the run trained with (its recorded chat template), beside EOS."""
    setup = getattr(engine, "chat_setup", None)
    return list(setup.stop_ids) if setup is not None else []


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
