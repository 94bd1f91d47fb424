"""Several processes on one run (torchrun; docs/design.md, "Images, devices, several GPUs"): which rows of a global batch
and which samples a rank owns, the network evaluated on those rows only, and the few collectives the training loop
and the sample stage need.

The stage creates the process group (stages/launch.py: NCCL on CUDA, gloo on the CPU); the library is handed a
`Group` (this process's rank, the world size) and never looks at the environment or keeps state of its own.

Why an N-process training run follows the single-process one (up to the order of float reductions):

- every rank draws the same global batch indices and transform randomness from the shared training generator (same
  seed, same calls, same order), so every rank holds the whole global (micro-)batch;
- the loss is called on that whole batch, so it draws its noise (t, z, probes) for all B rows exactly as the single
  process does, but the network, the expensive part, runs on this rank's rows only (`ShardRows`); the rank keeps
  the per-example losses of its rows [rank B/N, (rank+1) B/N);
- each rank's gradient is that of the mean over its B/N rows; their average over ranks (`average_gradients`, one
  all_reduce) is the gradient of the mean over the B rows, the single process's gradient.

What differs is float rounding only: the all_reduce sums the ranks' gradients in its own order, the mean over B/N
rows is a different sum than the mean over B, and a matrix product of B/N rows may block its sums differently than
one of B rows. Dropout masks come from each rank's global RNG and cannot follow the single process (they are
drawn inside the network for the rows it sees); with dropout the run is a correct N-process run, not a replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def shard(total: int, rank: int, world_size: int) -> slice:
    """The contiguous rows [rank total / N, (rank + 1) total / N) of `total` that rank `rank` of N owns.

    Rounded down at both ends, so any total is covered once, in order, with sizes differing by at most one
    (equal when N divides total, as training requires; sampling accepts any n)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    return slice(rank * total // world_size, (rank + 1) * total // world_size)


@dataclass(frozen=True)
class Group:
    """This process's place in the process group the stage created, and the collectives run through it.

    device: where the default group's tensors must live (this rank's GPU under NCCL, the CPU under gloo);
    control: a gloo group for host-side values (stop flags, per-rank states, samples), so that they never touch the
    GPU; None uses the default group (already gloo on the CPU).
    """

    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and logs."""
        return self.rank == 0

    def rows(self, total: int) -> slice:
        """This rank's rows of a batch of `total` (see `shard`)."""
        return shard(total, self.rank, self.world_size)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every .grad by its mean over the ranks: one SUM all_reduce per dtype of one flat buffer, then / N.

        Parameters without a gradient are skipped; every rank runs the same network and loss, so the same ones are
        None everywhere. The result is the same on every rank (one reduction, broadcast), so the optimiser steps
        keep the ranks' weights equal bit for bit."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in parameters:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])  # reshape: channels-last grads come out in logical order
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view(g.shape))
                offset += g.numel()

    def sum(self, value: Tensor) -> Tensor:
        """The sum over ranks of a tensor (a new tensor, on value's device; value is left alone)."""
        total = value.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(value.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: the ranks agree, e.g. to stop at the same step."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's picklable `obj`, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def barrier(self) -> None:
        """Wait until every rank got here (e.g. rank 0 has written a checkpoint before the others exit)."""
        dist.barrier(group=self.control)


class ShardRows(nn.Module):
    """A network model(x, c) evaluated on this rank's rows of the batch only; the other rows are zeros.

    The loss sees the whole global batch, so its noise is drawn for every row as in one process, while the network
    and its backward pass cost 1/N of the batch. The zero rows belong to other ranks: the training loop keeps only
    this rank's rows of the per-example loss, so they reach neither the loss nor the gradient (the losses here treat
    examples independently). x: (B, *D), c: (B,) -> (B, *out).
    """

    def __init__(self, net: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.net, self.rank, self.world_size = net, rank, world_size

    def forward(self, x: Tensor, c: Tensor, *rest: Any) -> Tensor:
        rows = shard(x.shape[0], self.rank, self.world_size)
        own = self.net(x[rows], c[rows], *(r[rows] if isinstance(r, Tensor) else r for r in rest))
        before = own.new_zeros((rows.start, *own.shape[1:]))
        after = own.new_zeros((x.shape[0] - rows.stop, *own.shape[1:]))
        return torch.cat([before, own, after])


# --------------------------------------------------------------------------- launching (used by the stages)

# The variables torchrun sets in every process it starts.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """What torchrun told this process: its global rank, its rank on this node (the GPU it takes), the world size."""

    rank: int
    local_rank: int
    size: int


def world_from_env(env: Mapping[str, str]) -> Optional[World]:
    """The World of a process torchrun started (RANK and WORLD_SIZE set), else None."""
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    rank = int(env["RANK"])
    return World(rank, int(env.get("LOCAL_RANK", rank)), int(env["WORLD_SIZE"]))


def torchrun_command(python: str, nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m module args`: N processes on this node
    with a rendezvous on a free local port (torchrun's --standalone); `python -m` rather than the `torchrun`
    script keeps the interpreter and its environment."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", module,
            *args]


def exit_status(returncode: int, statuses: Mapping[int, int], terminated: bool) -> int:
    """The exit status of a stage that ran under torchrun: the first non-zero status a rank reported (rank order;
    e.g. 143 after preemption, 2 for bad input), else torchrun's own (a signal's death as 128 + signal), and 143
    when this launcher forwarded SIGTERM and no rank said otherwise (torchrun itself exits 1 on a signal)."""
    for rank in sorted(statuses):
        if statuses[rank] != 0:
            return statuses[rank]
    if returncode == 0:
        return 0
    if terminated:
        return 143
    return 128 - returncode if returncode < 0 else returncode
