"""`mlxft train --nproc N / --hosts A,B / --hostfile F`: start the same command under the
backend's own launcher (torchrun for PyTorch, mlx.launch for MLX) so users need not spell it.

The launcher starts N copies of `python -m mlxft train ...` (these options removed); each copy
finds its rank in the launcher's environment. mlx.launch reports success even when a rank fails,
so the outcome is read from the run directory that rank 0 wrote.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mlxft.errors import ConfigError, MlxftError

LAUNCH_OPTIONS = ("--nproc", "--hosts", "--hostfile")


def strip_launch_options(argv: list[str]) -> list[str]:
    """argv without the launcher options (both `--opt VALUE` and `--opt=VALUE`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_OPTIONS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCH_OPTIONS and "=" in arg:
            continue
        out.append(arg)
    return out


def find_launcher(name: str) -> str | None:
    """The launcher installed next to this Python (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _tool(name: str) -> str:
    found = find_launcher(name)
    if not found:
        extra = "torch" if name == "torchrun" else "mlx"
        raise MlxftError(f"{name}: not found next to {sys.executable} or on PATH", f"pip install 'mlxft[{extra}]'")
    return found


def launcher_command(backend: str, argv: list[str], nproc: int | None, hosts: str | None,
                     hostfile: str | None) -> list[str]:
    args = ["-m", "mlxft", *strip_launch_options(argv)]
    if backend == "torch":
        if hosts or hostfile:
            raise ConfigError("--hosts/--hostfile: multi-host runs of the torch backend start with torchrun on "
                              "every host", "see the README section 'More than one machine'; --nproc N runs "
                              "N ranks on this machine")
        return [_tool("torchrun"), "--nproc-per-node", str(nproc or 1), "--no-python", sys.executable, *args]
    cmd = [_tool("mlx.launch"), "--python", sys.executable]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    else:
        cmd += ["--backend", "ring", "--hosts", hosts or "127.0.0.1"]
    if nproc:
        cmd += ["-n", str(nproc)]
    return [*cmd, "--", *args]


def run_launcher(cmd: list[str], out_dir: Path) -> int:
    """Run the launcher; the exit code comes from what rank 0 recorded in the run directory."""
    from mlxft import ui
    from mlxft.runs import Run, is_run_dir

    ui.info("launching: " + " ".join(cmd))
    try:
        code = subprocess.call(cmd)
    except KeyboardInterrupt:
        code = 130
    status = Run(out_dir).meta().get("status") if is_run_dir(out_dir) else None
    if status == "done":
        return 0
    if status == "interrupted":
        return 130
    return code or 1
