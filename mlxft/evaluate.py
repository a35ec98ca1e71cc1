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
from pathlib import Path

from mlxft.config import Config
from mlxft.data import Dataset, collate, eval_batches


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
    if resolved.run is None:
        return Config()
    from mlxft.runs import Run

    try:
        return Run(Path(resolved.run)).config()
    except Exception:  # a run folder from an older mlxft, or with a hand-edited config: score with defaults
        return Config()


def _engine(backend_name: str, cfg: Config):
    from mlxft.backends.select import make_backend

    ecfg = Config()
    ecfg.seed = cfg.seed
    ecfg.train.dtype = "float32" if backend_name == "torch" else "auto"
    return make_backend(backend_name, ecfg)


def evaluate(model_spec: str | None, data: str | None, backend: str = "auto", adapter: str = "best",
             batch_size: int = 8, max_seq_len: int | None = None, skip_bad_lines: bool = False,
             trust_remote_code: bool = False) -> dict:
    """Evaluate a model (or a run: base and tuned) on `data` (for a run, default: its validation file)."""
    from mlxft import ui
    from mlxft.backends.select import choose_backend
    from mlxft.errors import MlxftError
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_spec, adapter=adapter)
    cfg = _run_config(resolved)
    own_data = data is None and resolved.run is not None
    held_out = own_data and not cfg.data.valid and bool(cfg.data.train)
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
        engine.trust_remote_code = trust_remote_code
        label = "base + adapter" if adapter_path else "model"
        with ui.console.status(f"Loading {label} ({resolved.spec}) on {name}"):
            engine.load(resolved.path, adapter=adapter_path, train=False)
        return engine

    from mlxft.preference.evaluate import evaluate_pairs, is_pair_source

    if is_pair_source(cfg.data.train if held_out else data, cfg):  # preference pairs: mlxft/preference/
        return evaluate_pairs(resolved, data, cfg, name, load, batch_size, seq, skip_bad_lines, held_out)
    engine = load(None)
    from mlxft.training_data import read_source, validation_set

    if own_data:
        dataset = validation_set(cfg, engine.tokenizer, skip_bad_lines=skip_bad_lines, max_seq_len=seq)
    else:  # a file of the user's, read as a validation file of the run (data.columns where it needs them)
        dataset = read_source(cfg, data, engine.tokenizer, train=False, skip_bad_lines=skip_bad_lines,
                              max_seq_len=seq, own=False)
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
