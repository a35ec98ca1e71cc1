"""Loss, perplexity and token accuracy of a model on a JSONL set, and base vs tuned for a run.

The data is read and masked exactly as for training (same formats, chat template, prompt
masking, system prompt and max_seq_len; for a run, its own recipe's settings). Over all target
tokens t of all samples:

    loss       = -(1/N) sum_t log p(t | prefix)       (nats per target token)
    perplexity = exp(loss)
    accuracy   = share of targets that are the model's top-1 prediction

For a run directory the base model alone and the base plus the run's adapter are scored on the
same tokens, and the difference (tuned - base) is reported. A run's default data is its validation
file, or, when it held out a share of its training file (data.valid_split), that same held-out share.
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

from mlxft.config import Config
from mlxft.data import Dataset, collate, eval_batches, load_dataset, split_dataset


def score_dataset(engine, dataset: Dataset, batch_size: int = 8, max_batches: int | None = None,
                  world=None) -> dict:
    """The figures of one loaded backend on a tokenized dataset (used by `mlxft eval` and by the
    trainer's validation). In a distributed world each rank scores every size-th batch and the
    sums are added over ranks, so every rank gets the figures of the whole set."""
    loss_sum = 0.0
    n = correct = 0
    pad = engine.tokenizer.pad_token_id
    batches = eval_batches(dataset.samples, batch_size)
    batches = batches[:max_batches] if max_batches else batches
    if world is not None and world.distributed:
        batches = batches[world.rank::world.size]
    for idx in batches:
        r = engine.eval_batch(collate([dataset.samples[i] for i in idx], pad))
        loss_sum += r.loss_sum
        n += r.n_targets
        correct += r.n_correct
    if world is not None and world.distributed:
        loss_sum, n, correct = world.all_sum([loss_sum, n, correct])
        n, correct = int(round(n)), int(round(correct))
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / max(n, 1), "tokens": n}


def _run_config(resolved) -> Config:
    from mlxft.config import build_config

    if resolved.run is not None and (Path(resolved.run) / "config.yaml").is_file():
        try:
            return build_config(str(Path(resolved.run) / "config.yaml"))
        except Exception:
            pass
    return Config()


def held_out_split(cfg: Config, tokenizer, max_seq_len: int, skip_bad_lines: bool = False) -> Dataset:
    """The share of data.train a run held out for validation: the same seeded split of the same
    samples as training (read at the run's max_seq_len), each then read at `max_seq_len`."""
    kw = dict(mask_prompt=cfg.train.mask_prompt, system_prompt=cfg.data.system_prompt, skip_bad_lines=skip_bad_lines,
              columns=cfg.data.columns, split=cfg.data.split, limit=cfg.data.limit)
    _, valid = split_dataset(load_dataset(cfg.data.train, tokenizer, max_seq_len=cfg.train.max_seq_len, **kw),
                             cfg.data.valid_split, cfg.seed)
    if max_seq_len == cfg.train.max_seq_len:
        return valid
    held = {s.source for s in valid.samples}  # "file:line"

    def read(limit: int) -> list:
        return [s for s in load_dataset(cfg.data.train, tokenizer, max_seq_len=limit, **kw).samples if s.source in held]

    whole = read(sys.maxsize)
    return Dataset(read(max_seq_len), valid.fmt, valid.path, truncated=sum(len(s) > max_seq_len for s in whole))


def _engine(backend_name: str, cfg: Config):
    from mlxft.backends.select import make_backend

    ecfg = Config()
    ecfg.seed = cfg.seed
    ecfg.train.dtype = "float32" if backend_name == "torch" else "auto"
    return make_backend(backend_name, ecfg)


def evaluate(model_spec: str | None, data: str | None, backend: str = "auto", adapter: str = "best",
             batch_size: int = 8, max_seq_len: int | None = None, skip_bad_lines: bool = False) -> dict:
    """Evaluate a model (or a run: base and tuned) on `data` (for a run, default: its validation file)."""
    from mlxft import ui
    from mlxft.backends.select import choose_backend
    from mlxft.errors import MlxftError
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_spec, adapter=adapter)
    cfg = _run_config(resolved)
    held_out = data is None and resolved.run is not None and not cfg.data.valid and bool(cfg.data.train)
    if data is None:
        data = cfg.data.valid if resolved.run is not None else None
        if held_out:
            data = f"{cfg.data.train} (held out)"
        if not data:
            raise MlxftError("no evaluation data", "pass --data FILE.jsonl")
    name, _ = choose_backend(backend)
    seq = max_seq_len or cfg.train.max_seq_len

    def load(adapter_path):
        engine = _engine(name, cfg)
        label = "base + adapter" if adapter_path else "model"
        with ui.console.status(f"Loading {label} ({resolved.spec}) on {name}"):
            engine.load(resolved.path, adapter=adapter_path, train=False)
        return engine

    from mlxft.preference.evaluate import evaluate_pairs, is_pair_source

    if is_pair_source(cfg.data.train if held_out else data, cfg):  # preference pairs: mlxft/preference/
        return evaluate_pairs(resolved, data, cfg, name, load, batch_size, seq, skip_bad_lines, held_out)
    engine = load(None)
    if held_out:
        dataset = held_out_split(cfg, engine.tokenizer, seq, skip_bad_lines)
    else:
        dataset = load_dataset(data, engine.tokenizer, max_seq_len=seq, mask_prompt=cfg.train.mask_prompt,
                               system_prompt=cfg.data.system_prompt, skip_bad_lines=skip_bad_lines)
    if dataset.truncated:
        ui.warn(f"{data}: {dataset.truncated} samples longer than {seq} tokens were truncated")
    out = {"model": resolved.spec, "data": str(data), "samples": len(dataset), "format": dataset.fmt,
           "backend": name}
    with ui.console.status(f"Evaluating {len(dataset)} samples"):
        base = score_dataset(engine, dataset, batch_size)
    out["tokens"] = base.pop("tokens")
    if resolved.adapter is None:
        out.update(base)
        return out
    del engine
    gc.collect()
    engine = load(resolved.adapter)
    with ui.console.status(f"Evaluating {len(dataset)} samples with the adapter"):
        tuned = score_dataset(engine, dataset, batch_size)
    tuned.pop("tokens")
    out.update(base_model=str(resolved.path), adapter=str(resolved.adapter), base=base, tuned=tuned,
               delta={k: tuned[k] - base[k] for k in base})
    return out
