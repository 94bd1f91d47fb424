"""The device a stage computes on: train.device resolved, per-GPU lock files, and what N processes need.

Devices. train.device picks the kind (auto: CUDA when there is one); the GPU is picked here:
- under torchrun (LOCAL_RANK set) the process takes GPU LOCAL_RANK;
- alone on a node with several GPUs (e.g. `dvc queue start -j N`, where DVC sets no CUDA_VISIBLE_DEVICES per
  worker) it takes the first GPU nobody holds, holding an exclusive lock file (fcntl.flock on
  score-pipeline-gpu-<i>.lock in $SCORE_PIPELINE_LOCK_DIR, default the temp dir) until the process ends, when the
  OS releases it; with every GPU taken it shares one (chosen by its process id) and says so on stderr, rather than
  wait: sharing is what every worker did before these locks, never blocks, and small runs fit side by side;
- with one GPU it takes it, no lock.

The holder of a stage process's locks is the stage's (stages.launch.GPU_LOCKS): this module keeps no state. torch is
imported inside the functions, so that the stages which never compute (report, ema) start fast.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional

from pipeline.errors import DataError

if TYPE_CHECKING:
    import torch

LOCK_DIR_ENV = "SCORE_PIPELINE_LOCK_DIR"


class GpuLocks:
    """Exclusive per-GPU lock files that spread the stages of one node over its GPUs (see the module docstring).

    One instance per holder (the stage process has one, stages.launch.GPU_LOCKS); it keeps the files it locked
    open, and a lock lives as long as its open file: release() or the end of the process frees it. `count` GPUs are
    those torch sees; the lock files are named by CUDA_VISIBLE_DEVICES's entries when it is set, so workers
    restricted to different devices never collide on an index."""

    def __init__(self, env: Optional[dict] = None):
        self.env = os.environ if env is None else env
        self.held: list[tuple[int, Optional[IO[str]]]] = []  # (index, locked file or None when shared)

    def path(self, index: int) -> Path:
        visible = [v.strip() for v in self.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        name = visible[index] if index < len(visible) else str(index)
        return Path(self.env.get(LOCK_DIR_ENV) or tempfile.gettempdir()) / f"score-pipeline-gpu-{name}.lock"

    def _try(self, index: int) -> Optional[IO[str]]:
        """The open, exclusively locked lock file of GPU `index`, or None when another holder has it."""
        path = self.path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held elsewhere
            f.close()
            return None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")  # who holds it, for a person looking at the file
        f.flush()
        return f

    def acquire(self, count: int, n: int = 1) -> list[int]:
        """`n` GPU indices of `count` for this holder: the ones it holds already, else free ones (locked), topped up
        with shared ones (a message on stderr) when fewer than n are free."""
        if self.held:
            return [i for i, _ in self.held][:n]
        for i in range(count):
            if len(self.held) == n:
                break
            f = self._try(i)
            if f is not None:
                self.held.append((i, f))
        if len(self.held) < n:
            mine = {i for i, _ in self.held}
            others = [i for i in range(count) if i not in mine] or list(range(count))
            start = os.getpid() % len(others)
            shared = (others[start:] + others[:start])[:n - len(self.held)]
            self.held += [(i, None) for i in shared]
            print(f"device: every GPU of this node is held by another pipeline stage (lock files "
                  f"{self.path(0).parent}/score-pipeline-gpu-*.lock); sharing cuda:{', cuda:'.join(map(str, shared))}",
                  file=sys.stderr)
        locked = [str(self.path(i)) for i, f in self.held if f is not None]
        if locked:
            print(f"device: holding {', '.join(locked)} until this stage ends", file=sys.stderr)
        return sorted(i for i, _ in self.held)

    def release(self) -> None:
        """Give every held GPU back (closing a file releases its flock)."""
        for _, f in self.held:
            if f is not None:
                f.close()
        self.held = []


def cuda_count() -> int:
    """How many CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_device(setting: str, locks: GpuLocks) -> torch.device:
    """train.device resolved: 'auto' is CUDA when there is one, else the CPU; 'cuda' without CUDA is refused.

    The GPU: LOCAL_RANK's under torchrun; a free one (locked in `locks`) on a node with several; the only one
    otherwise."""
    import torch

    from pipeline import distributed

    if setting == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device: cuda, but torch sees no CUDA device here (use auto or cpu)")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    world, count = distributed.world_from_env(os.environ), torch.cuda.device_count()
    if world is not None:
        if world.local_rank >= count:
            raise DataError(f"torchrun started {world.local_rank + 1}+ processes on this node (LOCAL_RANK "
                            f"{world.local_rank}) but torch sees {count} CUDA device(s): one GPU per process")
        return torch.device("cuda", world.local_rank)
    if count > 1:
        return torch.device("cuda", locks.acquire(count)[0])
    return torch.device("cuda")


def check_gpus(setting: str, n: int, key: str) -> None:
    """Refuse, before launching, N processes that the node's GPUs cannot take: one GPU per process (NCCL refuses
    two ranks on one GPU). train.device cpu, or auto without CUDA, runs N CPU processes (gloo)."""
    count = cuda_count()
    if setting == "cuda" and count < n:
        raise DataError(f"{key}: {n} processes with train.device: cuda need {n} GPUs, one each; torch sees {count}")
    if setting == "auto" and 0 < count < n:
        raise DataError(f"{key}: {n} processes need {n} GPUs, one each, and torch sees {count} (train.device: auto); "
                        f"lower {key}, or set train.device: cpu for {n} CPU processes")


def set_tf32(device: torch.device, allowed: bool) -> None:
    """train.tf32: TF32 tensor-core matmuls and cuDNN convolutions on CUDA (10 mantissa bits in the products,
    fp32 accumulation; Ampere and later). Process-wide switches, so only a stage calls this, never the rest of the
    library; the CPU keeps torch's defaults."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively, which train.precision 'auto' asks (pipeline.defaults.train_settings):
    a CUDA device that supports it (Ampere and later), or a CPU whose oneDNN has bf16 kernels (AVX512-BF16 or AMX;
    elsewhere bf16 is emulated and slower than fp32)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and torch.backends.mkldnn.is_available() and check())
    return False
