"""Where a stage process computes: its GPU (GPU_LOCKS, pipeline.devices), and running a stage on several processes
(train.devices, sample.devices: the stage re-launches itself under torchrun, each rank joins the process group).

stages.common.run_stage decides which of these runs; this module imports nothing from stages.common at run time
(run_rank is handed the stage's MLflow run as `tracked`), so that common can import it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pipeline import devices, io
from pipeline.errors import DataError

if TYPE_CHECKING:  # torch loads only in the stages that use it: report and ema start in < 2 s
    import torch

    from pipeline import config, distributed
    from stages.common import StageBody

# The stage process's locks: held from its first choose_device until it exits.
GPU_LOCKS = devices.GpuLocks()
# Where the processes torchrun starts report their exit status to the stage that launched them (see relaunch).
STATUS_DIR_ENV = "SCORE_PIPELINE_STATUS_DIR"


def choose_device(setting: str) -> torch.device:
    """train.device resolved for this stage process (pipeline.devices.choose_device), its GPU held in GPU_LOCKS."""
    return devices.choose_device(setting, GPU_LOCKS)


def torchrun_world() -> Optional[distributed.World]:
    """The torchrun world of this process, or None; pipeline.distributed (torch) is imported only under torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    from pipeline import distributed

    return distributed.world_from_env(os.environ)


class SilentRun:
    """The StageRun of ranks other than 0: they log nothing (docs/design.md, "Tracking": only rank 0 logs)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("log") or name == "flush":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def relaunch(name: str, params: str, n: int, setting: str) -> int:
    """Run `python -m stages.<name> --params <params>` as N processes under torchrun on this node; its status.

    SIGTERM (SLURM's preemption notice) is forwarded to torchrun, which passes it to every rank; the ranks agree on
    the step to stop at and exit 143, which this process returns (torchrun itself would say 1). On a node with
    several GPUs the N GPUs are locked here (GpuLocks) and made the child's CUDA_VISIBLE_DEVICES, so two queued
    multi-process stages do not both take GPUs 0..N-1."""
    from pipeline import distributed

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # `-m stages.<name>` from any working directory (tests)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    count = devices.cuda_count() if setting != "cpu" else 0
    if count > 1:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        chosen = GPU_LOCKS.acquire(count, n)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i) for i in chosen)
    cmd = distributed.torchrun_command(sys.executable, n, f"stages.{name}", ["--params", params])
    print(f"{name}: {name}.devices: {n}: {' '.join(cmd[1:])}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="score-pipeline-ranks-") as status_dir:
        env[STATUS_DIR_ENV] = status_dir
        child = subprocess.Popen(cmd, env=env)
        terminated = _wait_forwarding_sigterm(child)
        statuses = {int(f.name.removeprefix("rank")): int(f.read_text()) for f in Path(status_dir).glob("rank*")}
    return distributed.exit_status(child.returncode, statuses, terminated)


def _wait_forwarding_sigterm(child: subprocess.Popen) -> bool:
    """Wait for `child`, passing on any SIGTERM this process gets; whether one came. Ctrl-C reaches the child
    from the terminal itself (same process group); this process then waits for it to wind down."""
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: nothing to forward from
        previous = None
    try:
        while True:
            try:
                child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return bool(received)


def run_rank(name: str, body: StageBody, cfg: config.Config, world: distributed.World,
             tracked: Callable[[Callable[[Any], None]], int]) -> int:
    """One rank of a stage under torchrun: join the process group (NCCL on this rank's GPU, gloo on the CPU, plus a
    gloo group for host-side values), run the body with it (rank 0 inside the MLflow stage run, `tracked(call)`,
    the others silent), report the exit status to the launching stage, leave the group."""
    import torch
    import torch.distributed as dist

    from pipeline import distributed

    status = 1
    try:
        device = choose_device(cfg.train.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
            control = dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo")
            control = None
        group = distributed.Group(world.rank, world.size, device, control)
        if group.is_main:
            status = tracked(lambda run: body(cfg, run, group=group))
        else:
            try:
                body(cfg, SilentRun(), group=group)
                status = 0
            except DataError:  # rank 0 says why
                status = 2
    except DataError as err:
        print(f"{name}: {err}", file=sys.stderr)
        status = 2
    except SystemExit as stop:  # e.g. 143 after preemption
        status = stop.code if isinstance(stop.code, int) else 1
        raise
    finally:
        _report_status(world.rank, status)
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


def _report_status(rank: int, status: int) -> None:
    """Leave this rank's exit status where relaunch reads it (nothing when torchrun was started by hand)."""
    where = os.environ.get(STATUS_DIR_ENV)
    if where and Path(where).is_dir():
        io.write_text(Path(where) / f"rank{rank}", str(status))
