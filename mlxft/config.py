"""Recipe configuration: dataclasses, YAML loading, `--set` overrides and validation.

Precedence: defaults < recipe YAML < `--set key.sub=value` < command-line flags.
An unknown key is an error that names it and suggests the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlxft.errors import ConfigError

# Shipped recipes live inside the package (so a wheel carries them); `recipes/` at the top of a
# checkout is a link to this folder.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class DataConfig:
    train: str | None = None
    valid: str | None = None
    valid_split: float = 0.1  # held-out share when no valid file is given
    system_prompt: str | None = None
    # Share of the training set made of the base model's own recorded answers. Supervised runs
    # default to 0.2 trained as distillation (replay_distill 16); preference runs to 0.5 of plain
    # NLL unless set (PREFERENCE_REPLAY; distillation when replay_distill is set).
    replay: float = 0.2
    replay_cut: str = "sentence"  # replay answers end at their last full sentence, or first_sentence
    replay_distill: int = 16  # K > 0: train replay tokens on the base's top-K distribution (KL to base)
    columns: dict[str, str] | None = None  # record field -> source column, e.g. {prompt: question}
    split: str | None = None  # Hugging Face datasets: the split of data.train (default "train")
    limit: int | None = None  # read at most this many samples from each data source


@dataclass
class TrainConfig:
    steps: int | None = None
    epochs: float | None = None  # None: chosen from the data size (mlxft/defaults.py)
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float | None = None  # None: chosen from the model size (mlxft/defaults.py)
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # steps when >= 1, else a fraction of the total
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    mask_prompt: bool = True
    grad_checkpoint: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    packing: bool = False
    compile: bool = False  # PyTorch: torch.compile the transformer blocks (docs/benchmarks.md: measured, off by default)
    eval_every: int | None = None  # None: about twice per epoch
    log_every: int = 1
    save_every: int = 50
    eval_batches: int | None = None
    early_stop_patience: int | None = 2  # validations without improvement; null or 0: off
    skip_nonfinite: bool = False
    method: str = "sft"  # sft | dpo | orpo (preference pairs: mlxft/preference/)
    beta: float | None = None  # DPO's KL weight / ORPO's odds-ratio weight; None: chosen (defaults)
    label_smoothing: float = 0.0  # DPO: share of pairs assumed flipped (conservative DPO)
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings while training (backends/neftune.py); 0: off
    sft_weight: float | None = None  # DPO: weight of the chosen answers' NLL (TRL's "sft" loss); None: chosen


@dataclass
class LoraConfig:
    type: str = "lora"  # lora | dora
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers: int | None = None  # adapt only the last N transformer blocks; None = all


@dataclass
class RetentionConfig:
    enabled: bool = True
    probes: int = 24
    max_new_tokens: int = 32
    warn_below: float = 0.9
    # The adapter generate/fuse/export use is the best by validation whose retention is at least
    # this; training also stops once retention is below it and validation stops improving. 0: off.
    # None: 0.9 (mlxft/defaults.py).
    floor: float | None = None
    # At most this many probes may change their answer (mlxft/probe_changes.py) in the adapter
    # kept, beside the floor; null: not capped (counted and shown only). Not capped by default:
    # measured on SmolLM2 (docs/retention.md), 4 to 13 of 24 probes counted as changed from the
    # second validation on while the mean stayed at 0.90-0.98, so a cap of 1 kept an untrained adapter.
    max_changed: int | None = None
    # Where no adapter that learned (made 90% of the run's fall in validation loss) meets the
    # floor, one that learned and reads under it by less than this outranks those that meet it
    # without having learned (mlxft/guard_policy.py); the verdict still says the floor was missed.
    # 0.02: about the mean's move between neighbouring validations, under its standard error
    # (0.025-0.031 over 24 probes; docs/retention.md). 0: a hard floor.
    floor_margin: float = 0.02
    # lazy: keep every validated adapter as a candidate and score retention where the stop needs
    # it and, after training, for the candidates still in the running, lowest validation loss
    # first (mlxft/candidates.py); deciding: at the validations where it can change the kept
    # adapter or the stop (mlxft/guard_policy.py); every: at every validation.
    score_at: str = "lazy"


@dataclass
class Config:
    model: str | None = None
    backend: str = "auto"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Preference runs' replay when the recipe leaves it open: their replay trains as NLL only
# (docs/preference.md measured DPO and ORPO with 0.5; 0.25 held retention worse).
PREFERENCE_REPLAY = 0.5

BACKENDS = ("auto", "torch", "mlx")
LORA_TYPES = ("lora", "dora")
METHODS = ("sft", "dpo", "orpo")  # train.method; dpo/orpo train on pairs (mlxft/preference/)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys.extend(_all_keys(sub, name + "."))
        else:
            keys.append(name)
    return keys


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see `mlxft recipes show quickstart` for valid keys"
    return ConfigError(f"{where}: unknown key '{key}'", hint)


def _coerce(value: Any, hint, key: str, where: str):
    """Convert a YAML or --set value to the dataclass field's type, or fail naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def _apply(obj, data: dict, where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None:
                continue
            _apply(getattr(obj, key), value, where, full + ".")
        else:
            setattr(obj, key, _coerce(value, hint, full, where))


def parse_set(assignments: list[str] | tuple[str, ...]) -> dict:
    """Turn ["train.steps=10", "lora.rank=4"] into a nested dict (values parsed as YAML scalars)."""
    nested: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in _all_keys():
            raise _unknown(key, "--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def recipe_path(name_or_path: str) -> Path:
    """A recipe by name (recipes/NAME.yaml) or by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = list_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"available: {', '.join(names) or 'none'}"
    raise ConfigError(f"unknown recipe '{name_or_path}'", hint)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    return data


def build_config(recipe: str | None = None, sets: list[str] | tuple[str, ...] = (),
                 flags: dict | None = None) -> Config:
    """Defaults < recipe < --set < flags. Relative data paths in a recipe resolve against the
    recipe's folder when they exist there, else against the working directory."""
    cfg = Config()
    given: set[str] = set()  # the keys the recipe, --set or flags named
    if recipe:
        path = recipe_path(recipe)
        data = load_yaml(path)
        _apply(cfg, data, str(path))
        given |= _dotted(data)
        for key in ("train", "valid"):
            value = getattr(cfg.data, key)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                beside = path.parent / value
                if beside.exists():
                    setattr(cfg.data, key, str(beside))
    if sets:
        parsed = parse_set(sets)
        _apply(cfg, parsed, "--set")
        given |= _dotted(parsed)
    if flags:
        _apply(cfg, {k: v for k, v in flags.items() if v is not None and not isinstance(v, dict)}, "flags")
        for k, v in flags.items():
            if isinstance(v, dict):
                section = {k: {kk: vv for kk, vv in v.items() if vv is not None}}
                _apply(cfg, section, "flags")
                given |= _dotted(section)
    _method_defaults(cfg, given)
    validate(cfg)
    return cfg


def _dotted(data, prefix: str = "") -> set[str]:
    """The dotted keys a (nested) recipe mapping names."""
    if not isinstance(data, dict):
        return set()
    keys = set()
    for key, value in data.items():
        keys.add(prefix + str(key))
        keys |= _dotted(value, f"{prefix}{key}.")
    return keys


def _method_defaults(cfg: Config, given: set[str]) -> None:
    """Replay for preference runs where nothing named it: PREFERENCE_REPLAY of plain NLL (the
    setting docs/preference.md measured; distillation there only where a key asks for it)."""
    if cfg.train.method == "sft":
        return
    if "data.replay" not in given:
        cfg.data.replay = PREFERENCE_REPLAY
    if "data.replay_distill" not in given:
        cfg.data.replay_distill = 0


def validate(cfg: Config) -> None:
    t, lo = cfg.train, cfg.lora
    checks = [
        (cfg.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}"),
        (lo.type in LORA_TYPES, "lora.type", f"must be one of {', '.join(LORA_TYPES)}"),
        (t.dtype in DTYPES, "train.dtype", f"must be one of {', '.join(DTYPES)}"),
        (t.steps is None or t.steps > 0, "train.steps", "must be positive"),
        (t.epochs is None or t.epochs > 0, "train.epochs", "must be positive"),
        (t.batch_size > 0, "train.batch_size", "must be positive"),
        (t.grad_accumulation > 0, "train.grad_accumulation", "must be positive"),
        (t.learning_rate is None or t.learning_rate > 0, "train.learning_rate", "must be positive"),
        (t.warmup >= 0, "train.warmup", "must be >= 0"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be between 0 and 1"),
        (t.max_seq_len >= 8, "train.max_seq_len", "must be at least 8"),
        (t.eval_every is None or t.eval_every > 0, "train.eval_every", "must be positive"),
        (t.log_every > 0, "train.log_every", "must be positive"),
        (t.save_every > 0, "train.save_every", "must be positive"),
        (t.early_stop_patience is None or t.early_stop_patience >= 0, "train.early_stop_patience", "must be >= 0"),
        (t.method in METHODS, "train.method", f"must be one of {', '.join(METHODS)}"),
        (t.beta is None or t.beta > 0, "train.beta", "must be positive"),
        (0 <= t.label_smoothing < 0.5, "train.label_smoothing", "must be in [0, 0.5)"),
        (t.neftune_alpha >= 0, "train.neftune_alpha", "must be >= 0 (0: off)"),
        (t.sft_weight is None or t.sft_weight >= 0, "train.sft_weight", "must be >= 0"),
        (lo.rank > 0, "lora.rank", "must be positive"),
        (lo.alpha > 0, "lora.alpha", "must be positive"),
        (0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (len(lo.targets) > 0, "lora.targets", "must name at least one module"),
        (lo.layers is None or lo.layers > 0, "lora.layers", "must be positive"),
        (0 < cfg.data.valid_split < 1, "data.valid_split", "must be between 0 and 1"),
        (0 <= cfg.data.replay < 1, "data.replay", "must be in [0, 1)"),
        (_is_column_map(cfg.data.columns), "data.columns", "must map record fields (prompt, completion, text, "
         "messages, conversations, instruction, input, output, system, tools, chosen, rejected) to column names"),
        (cfg.data.limit is None or cfg.data.limit > 0, "data.limit", "must be positive"),
        (cfg.retention.probes >= 0, "retention.probes", "must be >= 0"),
        (cfg.retention.max_new_tokens >= 1, "retention.max_new_tokens", "must be at least 1"),
        (0 <= cfg.retention.warn_below <= 1, "retention.warn_below", "must be between 0 and 1"),
        (cfg.retention.floor is None or 0 <= cfg.retention.floor <= 1, "retention.floor", "must be between 0 and 1"),
        (cfg.retention.max_changed is None or cfg.retention.max_changed >= 0, "retention.max_changed",
         "must be >= 0 or null"),
        (0 <= cfg.retention.floor_margin <= 1, "retention.floor_margin", "must be between 0 and 1"),
        (cfg.retention.score_at in ("lazy", "deciding", "every"), "retention.score_at",
         "must be lazy, deciding or every"),
        (cfg.data.replay_cut in ("sentence", "first_sentence"), "data.replay_cut", "must be sentence or first_sentence"),
        (isinstance(cfg.data.replay_distill, int) and 0 <= cfg.data.replay_distill <= 256, "data.replay_distill",
         "must be an integer from 0 (off) to 256"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"'{key}' {why}")


def _is_column_map(columns) -> bool:
    from mlxft.formats.records import FIELDS

    return columns is None or (isinstance(columns, dict) and bool(columns) and all(
        k in FIELDS and isinstance(v, str) and v for k, v in columns.items()))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
