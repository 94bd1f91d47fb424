"""The one walker of every sampling grid: samplers are step functions, `walk` is their only loop.

A step is `step(x, t_cur, t_next, fn, process, generator) -> x_next` with t_cur, t_next Python floats
taken from a float64 grid walked as zip(t[:-1], t[1:]) (docs/design.md, "The core abstraction"); options are
bound beforehand (functools.partial). Guidance wraps `fn`; inpainting or editing wraps `step`.

The walker counts the network evaluations itself: nfe is the number of network evaluations per sample,
each call of `fn` adding `fn.evaluations` (default 1: one evaluation of the whole batch; a guided score
that evaluates the network on a doubled batch, pipeline.guidance.guided_score, says 2). Steps therefore
return just the next state, and a step cannot misreport its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from pipeline import rng
from pipeline.processes import Process

Step = Callable[..., Tensor]


@dataclass
class SampleResult:
    """Samples x (N, *D), the number of network evaluations per sample, and the recorded (t, x) states.

    `trajectory` is empty unless the sampler was asked to record (walk's `record`); its tensors are
    detached copies on x's device.
    """

    x: Tensor
    nfe: int
    trajectory: list[tuple[float, Tensor]] = field(default_factory=list)


WalkResult = SampleResult


def record_positions(record: Optional[int], n_states: int) -> set[int]:
    """`record` positions evenly spread over states 0..n_states-1, always the first and the last (all if fewer)."""
    if record is None:
        return set()
    if isinstance(record, bool) or not isinstance(record, int) or record < 2:
        raise ValueError(f"record must be None or an integer >= 2 (the first and the final x at least), got {record!r}")
    if record >= n_states:
        return set(range(n_states))
    return {round(k * (n_states - 1) / (record - 1)) for k in range(record)}


def walk(step: Step, x: Tensor, grid: Tensor | Sequence[float], fn: Callable, process: Process,
         generator: rng.Generator, *, record: Optional[int] = None, progress: bool = False,
         desc: Optional[str] = None) -> SampleResult:
    """Walk `step` over the pairs (grid[i], grid[i+1]) from the state x at grid[0].

    record=k also returns k states (t, x) evenly spread over the walk, the start x (at grid[0]) and the
    final x included, detached and on x's device. The grid is read as Python floats once, so steps
    branch on floats (e.g. t_next == grid[-1]) without touching the device.
    """
    times = grid.tolist() if isinstance(grid, Tensor) else [float(t) for t in grid]
    if len(times) < 1:
        raise ValueError("a sampling grid needs at least one time")
    pairs = list(zip(times[:-1], times[1:]))
    keep = record_positions(record, len(times))
    nfe = 0
    per_call = getattr(fn, "evaluations", 1)

    def counted(*args, **kwargs):
        nonlocal nfe
        nfe += per_call
        return fn(*args, **kwargs)

    trajectory: list[tuple[float, Tensor]] = []
    if 0 in keep:
        trajectory.append((times[0], x.detach().clone()))
    name = desc or getattr(step, "__name__", None) or getattr(getattr(step, "func", None), "__name__", "sampling")
    for i, (t_cur, t_next) in enumerate(tqdm(pairs, desc=name, disable=not progress, mininterval=1.0,
                                                leave=False)):
        x = step(x, t_cur, t_next, counted, process, generator)
        if i + 1 in keep:
            trajectory.append((t_next, x.detach().clone()))
    return SampleResult(x, nfe, trajectory)


def prior_walk(step: Step, fn: Callable, process: Process, shape: tuple[int, ...], generator: rng.Generator,
               grid: Tensor | Sequence[float], *, device=None, record: Optional[int] = None, progress: bool = False,
               desc: Optional[str] = None) -> SampleResult:
    """`walk` from a prior draw process.prior_sample(shape, generator, device) at grid[0]."""
    x = process.prior_sample(shape, generator, device)
    return walk(step, x, grid, fn, process, generator, record=record, progress=progress, desc=desc)
