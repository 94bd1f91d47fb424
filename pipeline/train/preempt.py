"""Preemption, part (d) of the training loop: should_stop is asked once per step, after the optimizer step, the EMA
update and the step's evaluation, loss row and checkpoint; when it answers True on any rank, every rank stops at
that step, a checkpoint of it (with the partial loss sum, so the resumed run writes the same rows) is written and
Preempted is raised. It is never asked after the last step: that run is done. stop_on_sigterm is the should_stop of a
process that SIGTERM stops (the train stage's)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

from pipeline.distributed import Group


class Preempted(Exception):
    """Training stopped at `step` because should_stop() asked it to; `checkpoint` resumes it exactly."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"preempted at step {step}; the checkpoint {checkpoint} resumes the run")
        self.step, self.checkpoint = step, checkpoint


def stop_requested(should_stop: Optional[Callable[[], bool]], step: int, steps: int, group: Optional[Group]) -> bool:
    """should_stop's answer after `step` of `steps`, the same on every rank (one SIGTERM seen by any rank stops all)."""
    if should_stop is None or step >= steps:
        return False
    stop = should_stop()
    return stop if group is None else group.any(stop)


def preempt(step: int, checkpoint: Path, group: Optional[Group]) -> NoReturn:
    """Raise Preempted(step, checkpoint) on every rank, once the checkpoint is written."""
    if group is not None:  # nobody exits (and torchrun stops nobody) before rank 0 has written the checkpoint
        group.barrier()
    raise Preempted(step, checkpoint)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """A should_stop for the training loop: True once SIGTERM arrived (SLURM's notice before preemption or the
    end of the time limit; `kill`). The handler only records it; the loop ends its step, writes a checkpoint
    and raises Preempted. The previous handler comes back on exit; off the main thread, where Python cannot
    set handlers, nothing is installed and training is never stopped early."""
    received: list[int] = []
    try:
        previous, installed = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum)), True
    except ValueError:  # not the main thread
        previous, installed = None, False
    try:
        yield lambda: bool(received)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)
