"""Data-parallel world: which rank this process is, and the few collectives the trainer needs.

mlxft brings no communication of its own. Under `torchrun` it uses torch.distributed (gloo on
CPU, NCCL on CUDA); under `mlx.launch` it uses mx.distributed (ring over TCP or Thunderbolt,
MPI where installed). A plain `mlxft train` is a world of one and none of this runs.

Every collective here is blocking and raises PeerLost when another rank has gone away, so a
dead rank stops the others with one clear line instead of a hang or a C++ traceback.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np

from mlxft.errors import MlxftError

_LOST_PEER_HINTS = ("closed by peer", "connection", "peer", "socket", "broken pipe", "timed out",
                    "timeout", "nccl", "gloo", "ring")


class PeerLost(MlxftError):
    """Another rank stopped answering (killed, crashed or unreachable)."""

    def __init__(self, message: str, hint: str | None = None, detail: str = ""):
        super().__init__(message, hint)
        self.detail = detail


def let_one_terminate_pass() -> None:
    """After this rank lost contact with another: let one SIGTERM pass, so the rank lives to say
    which checkpoint is intact and how to resume. mlx.launch and torchrun terminate every
    surviving rank as soon as one dies, often before the survivor has printed its error; a
    second SIGTERM still ends the process."""

    def first(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first)


def launcher_in_env(environ=None) -> str | None:
    """'torchrun', 'mlx.launch' or None, from the variables each launcher sets for its ranks."""
    env = os.environ if environ is None else environ
    if "MLX_RANK" in env:
        return "mlx.launch"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env:  # mlx.launch --backend mpi starts ranks through mpirun
        return "mlx.launch"
    return None


class World:
    """A world of one: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    launcher: str | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def label(self) -> str:
        return f"rank {self.rank}/{self.size}"

    def all_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return [data]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        return data or b""

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _lost(self, exc: BaseException) -> PeerLost:
        # "[/path/gloo/pair.cc:537] Read error ...: Connection reset by peer. This is typically..."
        detail = re.sub(r"^\[[^\]]*:\d+\]\s*", "", " ".join(str(exc).split()))
        detail = detail.split(". ")[0][:160]
        return PeerLost(f"{self.label()}: lost contact with another rank ({detail})",
                        "a rank was killed or crashed; see its own output", detail=detail)


def _is_comm_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(h in text for h in _LOST_PEER_HINTS)


class TorchWorld(World):
    """torch.distributed under torchrun: gloo on CPU, NCCL when each rank has a CUDA device."""

    launcher = "torchrun"

    def __init__(self, timeout_s: float):
        import datetime

        import torch
        import torch.distributed as dist

        self.dist, self.torch = dist, torch
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.device = "cpu"
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = f"cuda:{self.local_rank}"
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # Objects travel over gloo even when gradients use NCCL (byte blobs stay on the CPU).
        self._cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_comm_error(exc) or isinstance(exc, getattr(self.dist, "DistBackendError", ())):
                raise self._lost(exc) from None
            raise

    def all_sum_tensor(self, tensor) -> None:
        """Sum `tensor` over ranks, in place."""
        self._call(self.dist.all_reduce, tensor)

    def broadcast_tensor(self, tensor) -> None:
        self._call(self.dist.broadcast, tensor, 0)

    def all_sum(self, values: list[float]) -> list[float]:
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        self.all_sum_tensor(t)
        return [float(v) for v in t.cpu()]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        out: list = [None] * self.size
        self._call(self.dist.all_gather_object, out, data, group=self._cpu_group)
        return out

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        box = [data if self.is_root else None]
        self._call(self.dist.broadcast_object_list, box, 0, group=self._cpu_group)
        return box[0] or b""

    def barrier(self) -> None:
        self._call(self.dist.barrier, group=self._cpu_group)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class MLXWorld(World):
    """mx.distributed under mlx.launch (ring, MPI; JACCL on Thunderbolt 5 Macs)."""

    launcher = "mlx.launch"

    def __init__(self, group):
        import mlx.core as mx

        self.mx, self.group = mx, group
        self.rank, self.size = group.rank(), group.size()
        self.local_rank, self.local_size = self.rank, self.size

    def _eval(self, array):
        try:
            self.mx.eval(array)
        except Exception as exc:
            if _is_comm_error(exc):
                raise self._lost(exc) from None
            raise
        return array

    def all_sum_array(self, array):
        """Sum an mx.array over ranks (evaluated here, so a lost peer surfaces here)."""
        return self._eval(self.mx.distributed.all_sum(array, group=self.group, stream=self.mx.cpu))

    def broadcast_array(self, array):
        """Rank 0's value everywhere: the others contribute zeros to a sum."""
        mine = array if self.is_root else self.mx.zeros_like(array)
        return self.all_sum_array(mine)

    def all_sum(self, values: list[float]) -> list[float]:
        mx = self.mx
        # float64 (CPU stream only) keeps large sums such as token counts exact; mx.array would
        # make float32 of a float64 numpy array unless told.
        out = self.all_sum_array(mx.array(np.asarray(values, dtype=np.float64), dtype=mx.float64))
        return [float(v) for v in np.array(out)]

    def _lengths(self, n: int) -> list[int]:
        mx = self.mx
        lengths = self._eval(mx.distributed.all_gather(mx.array([n], mx.int64), group=self.group,
                                                       stream=mx.cpu))
        return [int(x) for x in np.array(lengths)]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        mx = self.mx
        lengths = self._lengths(len(data))
        width = max(max(lengths), 1)
        row = np.zeros((1, width), dtype=np.uint8)
        row[0, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = np.array(self._eval(mx.distributed.all_gather(mx.array(row), group=self.group, stream=mx.cpu)))
        return [rows[i, :n].tobytes() for i, n in enumerate(lengths)]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        mx = self.mx
        n = int(self.all_sum([len(data or b"") if self.is_root else 0])[0])
        buf = np.zeros(max(n, 1), dtype=np.uint8)
        if self.is_root and n:
            buf[:n] = np.frombuffer(data, dtype=np.uint8)
        out = self.broadcast_array(mx.array(buf))
        return np.array(out)[:n].tobytes()

    def barrier(self) -> None:
        self.all_sum([0.0])


_world: World | None = None


def get_world() -> World:
    """The world this process belongs to (a world of one until init_world ran)."""
    return _world or World()


def init_world(timeout_s: float | None = None) -> World:
    """Join the launcher's world, once per process. A process no launcher started is a world
    of one, without importing torch.distributed or touching the network."""
    global _world
    if _world is not None:
        return _world
    launcher = launcher_in_env()
    timeout_s = timeout_s or float(os.environ.get("MLXFT_DIST_TIMEOUT", 1800))
    if launcher == "torchrun" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        _world = TorchWorld(timeout_s)
    elif launcher == "mlx.launch":
        import mlx.core as mx

        group = mx.distributed.init()
        _world = MLXWorld(group) if group.size() > 1 else World()
    else:
        _world = World()
    return _world


def reset_world() -> None:
    """Leave the world (end of a run, and between tests)."""
    global _world
    if _world is not None:
        _world.close()
    _world = None


def resume_command(world: World, run_dir) -> str:
    """How to continue `run_dir` with the world that wrote it."""
    if world.launcher == "torchrun":
        return f"torchrun --nproc-per-node {world.local_size} -m mlxft train --resume {run_dir} (on every host)" \
            if world.size > world.local_size else f"torchrun --nproc-per-node {world.size} -m mlxft train --resume {run_dir}"
    if world.launcher == "mlx.launch":
        return f"mlx.launch <the same hosts> --python {sys.executable} -- -m mlxft train --resume {run_dir}"
    return f"mlxft train --resume {run_dir}"


def backend_for_launcher(launcher: str | None, requested: str) -> str:
    """The training backend a launcher implies: torchrun starts PyTorch ranks, mlx.launch MLX ones."""
    if launcher is None:
        return requested
    wanted = "torch" if launcher == "torchrun" else "mlx"
    if requested not in ("auto", wanted):
        other = "mlx.launch" if wanted == "torch" else "torchrun"
        raise MlxftError(f"--backend {requested}: this process was started by {launcher}, which runs "
                         f"{wanted} ranks", f"start {requested} ranks with {other}, or pass --backend {wanted}")
    return wanted


def dir_to_bytes(path: Path, members: list[str] | None = None) -> bytes:
    """A folder (or the named entries of it) as an in-memory tar: how per-rank state and resume
    checkpoints travel between ranks."""
    path = Path(path)
    tops = [path / m for m in members] if members else [path]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for top in tops:
            for item in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
                if item != path:
                    tar.add(item, arcname=str(item.relative_to(path)), recursive=False)
    return buf.getvalue()


def bytes_to_dir(data: bytes, dest: Path) -> None:
    """Unpack what dir_to_bytes made into `dest` (created); member paths cannot leave `dest`."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")
