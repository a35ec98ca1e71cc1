"""Training progress on stderr: a rich bar (step, loss, lr, tokens/s, MFU, ETA, memory) on a
terminal; plain periodic lines otherwise.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / the device's measured matmul FLOP/s
(`mlxft.devicebench`, the figure `mlxft doctor --bench` prints, for the dtype training computes
in). FLOPs per token is a documented approximation, computed by the backend
(`Backend.model_flops`, `TorchBackend.flops_per_token`): 2 x the weights of the transformer blocks' linear layers for
the forward pass, plus 2 x those of the blocks from the earliest adapted one up for the activation
gradients of the backward pass (frozen weights need no weight gradients), plus 6 x the LoRA weights
(forward, activation gradient, weight gradient). Left out: the output head (mlxft applies it
only at target positions), attention scores,
recomputation under gradient checkpointing (model FLOPs, not hardware FLOPs), and padding (tokens/s
counts real tokens only). A backend that gives no FLOPs figure simply shows no MFU.
"""

from __future__ import annotations

import time

from rich import filesize
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlxft import ui
from mlxft.sysinfo import peak_rss_bytes

def mfu(tok_s: float, per_token: float | None, device_flops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction, None when either figure is unknown."""
    if not per_token or not device_flops or tok_s <= 0:
        return None
    return tok_s * per_token / device_flops


def fmt_bytes(n: int | None) -> str:
    """A byte count for people (rich.filesize: 1.2 GB); '-' when unknown."""
    return filesize.decimal(n) if n else "-"


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, plain_every: int = 10,
                 flops_per_token: float | None = None, device_flops: float | None = None, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled  # False on ranks other than 0: one progress display per run
        self.interactive = enabled and ui.is_interactive()
        self.plain_every = plain_every
        self.started = time.monotonic()
        self.flops_per_token, self.device_flops = flops_per_token, device_flops
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
        util = mfu(tok_s, self.flops_per_token, self.device_flops)
        stats = f"loss {loss:.3f}" + (f" val {val:.3f}" if val is not None else "") + \
                f" lr {lr:.1e} {tok_s:,.0f} tok/s" + (f" mfu {util:.0%}" if util is not None else "") + f" mem {mem}"
        if self.progress:
            self.progress.update(self.task, completed=step, stats=stats)
        elif not self.enabled:
            return
        elif step == 1 or step % self.plain_every == 0 or step == self.total:
            ui.console.print(f"step {step}/{self.total} {stats}")

    def message(self, text: str):
        if self.enabled:
            ui.console.print(text)
