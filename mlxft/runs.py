"""The run directory: resolved config, run metadata, metrics, adapters and checkpoints.

Layout:
    RUN/config.yaml        the resolved recipe (defaults < recipe < --set < flags)
    RUN/run.json           model spec, resolved base path, revision, backend, status, results
    RUN/metrics.jsonl      one JSON object per logged train step or validation
    RUN/adapter/           the last adapter (PEFT layout)
    RUN/adapter-best/      the best-by-validation adapter (PEFT layout); fuse/export default
    RUN/checkpoint/        resume state (adapter + optimizer/scheduler/RNG/data cursor)
    RUN/loss.png           loss curves
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mlxft.atomic import atomic_file
from mlxft.errors import ModelError

RUN_FILE = "run.json"


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / RUN_FILE).is_file()


@dataclass
class Run:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def last_adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def best_adapter(self) -> Path:
        return self.path / "adapter-best"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def config(self):
        """The run's resolved recipe (RUN/config.yaml) as a Config."""
        from mlxft.config import build_config, load_yaml

        if not self.config_file.is_file():
            raise ModelError(f"{self.path}: not a run directory (no config.yaml)")
        cfg = build_config(str(self.config_file))
        if "replay_distill" not in ((load_yaml(self.config_file) or {}).get("data") or {}):
            cfg.data.replay_distill = 0  # written before the key existed: that run replayed sampled tokens
        return cfg

    def adapter(self, which: str = "best") -> Path:
        """The best-by-validation adapter when there is one, else the last."""
        if which == "best" and (self.best_adapter / "adapter_config.json").is_file():
            return self.best_adapter
        if (self.last_adapter / "adapter_config.json").is_file():
            return self.last_adapter
        raise ModelError(f"{self.path}: run has no saved adapter yet")

    def meta(self) -> dict:
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{self.path / RUN_FILE}: unreadable run file ({exc})") from None

    def update_meta(self, **fields) -> dict:
        data = self.meta() if is_run_dir(self.path) else {}
        data.update(fields)
        with atomic_file(self.path / RUN_FILE, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
        return data

    def base_model_path(self) -> Path:
        meta = self.meta()
        path = Path(meta.get("model_path", ""))
        if not (path / "config.json").is_file():
            raise ModelError(f"{self.path}: its base model {meta.get('model')!r} is no longer at {path}")
        return path

    def metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
        return rows


def create_run(path: Path | str, **meta) -> Run:
    from mlxft.atomic import write_errors

    run = Run(Path(path))
    with write_errors("run directory", run.path):
        run.path.mkdir(parents=True, exist_ok=True)
        run.update_meta(created=time.strftime("%Y-%m-%dT%H:%M:%S"), **meta)
    return run


def default_run_dir(name: str) -> Path:
    """runs/NAME, or runs/NAME-2, -3... when taken."""
    base = Path("runs") / name
    if not base.exists():
        return base
    i = 2
    while (Path("runs") / f"{name}-{i}").exists():
        i += 1
    return Path("runs") / f"{name}-{i}"


class MetricsWriter:
    """Appends one JSON line per record and flushes, so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        from mlxft.atomic import write_errors

        with write_errors("metrics", self.fh.name):
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        self.fh.close()
