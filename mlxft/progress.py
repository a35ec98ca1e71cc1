"""Training progress on stderr: a rich bar (step, loss, lr, tokens/s, ETA, memory) on a
terminal; plain periodic lines otherwise."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlxft import ui
from mlxft.sysinfo import peak_rss_bytes


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, plain_every: int = 10):
        self.total = total_steps
        self.interactive = ui.is_interactive()
        self.plain_every = plain_every
        self.started = time.monotonic()
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=ui.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def step(self, step: int, loss: float, lr: float, tok_s: float, val: float | None, peak: int | None):
        mem = fmt_bytes(peak or peak_rss_bytes())
        stats = f"loss {loss:.3f}" + (f" val {val:.3f}" if val is not None else "") + \
                f" lr {lr:.1e} {tok_s:,.0f} tok/s mem {mem}"
        if self.progress:
            self.progress.update(self.task, completed=step, stats=stats)
        elif step == 1 or step % self.plain_every == 0 or step == self.total:
            ui.console.print(f"step {step}/{self.total} {stats}")

    def message(self, text: str):
        ui.console.print(text)
