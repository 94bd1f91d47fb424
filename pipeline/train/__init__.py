"""The training loop: Adam, optional gradient clipping, EMA, checkpoints and resume; mixed precision, gradient
accumulation, learning-rate warm-up, channels-last and torch.compile for GPUs; preemption (should_stop); several
processes (a pipeline.distributed.Group: each rank trains on its rows of every global batch, see that module).

train() strings its four parts together, each a module that reads alone:
  pipeline.train.state       (a) state and resume: Adam, the EMAs, lr warm-up, GradScaler, the checkpoint and its
                                 fingerprint (pipeline.posthoc: the post-hoc EMA's profiles and snapshots)
  pipeline.train.step        (b) one optimisation step: batch, micro-batches, autocast, grad scaling, clipping, EMA
  pipeline.train.evaluation  (c) loss rows and the held-out evaluation cadence
  pipeline.train.preempt     (d) preemption: should_stop agreed across ranks, checkpoint, Preempted
and pipeline.train.settings holds its inputs (TrainSettings, TrainData, Hooks). Every name callers import from here
is re-exported. Every knob defaults to the plain fp32 loop, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.distributed import Group
from pipeline.pixels import image_batches
from pipeline import posthoc
from pipeline.train.settings import (NO_COMPILE_LOSSES, PRECISIONS, BatchTransform, Evaluator, Hooks, LossFn,
                                   TrainData, TrainSettings, check_train, settings_from)
from pipeline.train.evaluation import eval_csv, evaluate_if_due, held_out_evaluator, log_if_due, loss_csv
from pipeline.train.preempt import Preempted, preempt, stop_on_sigterm, stop_requested
from pipeline.train.state import (CHECKPOINT, Checkpoints, TrainState, ema_multi_avg_fn, fingerprint,
                                  fingerprinted_train, lr_factor, new_state, resume, save_checkpoint,
                                  resolved_fingerprint, warmup_factor)
from pipeline.train.step import (autocast, draw_batch, micro_batches, optimisation_step, to_device,
                                 training_network)

__all__ = [
    "CHECKPOINT", "NO_COMPILE_LOSSES", "PRECISIONS", "BatchTransform", "Checkpoints", "Evaluator", "Hooks", "LossFn",
    "Preempted", "TrainData", "TrainResult", "TrainSettings", "TrainState", "autocast", "check_train",
    "ema_multi_avg_fn", "eval_csv", "fingerprint", "fingerprinted_train", "held_out_evaluator", "image_batches",
    "loss_csv", "lr_factor", "micro_batches", "resolved_fingerprint", "settings_from", "stop_on_sigterm", "to_device",
    "train", "warmup_factor",
]


@dataclass
class TrainResult:
    """The trained network, its EMA copy, and the loss curve rows (step, mean loss since last row)."""

    model: nn.Module
    ema: nn.Module
    loss_rows: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0
    eval_rows: list[dict] = field(default_factory=list)


def train(model: nn.Module, loss_fn: LossFn, data: TrainData, settings: TrainSettings, checkpoints: Checkpoints,
          hooks: Hooks = Hooks(), device: torch.device | str = "cpu", group: Optional[Group] = None) -> TrainResult:
    """Train `model` on data.x (N, *D) with mini-batches drawn with replacement; resume checkpoints.path if it fits.

    A resumed run gives the same bits as an uninterrupted one. With a `group` of N > 1 processes every rank draws
    the same global batch and noise, runs the network on its rows and the gradients are averaged, so the run
    follows the single-process one up to float reductions (batch_size / accumulate must be a multiple of N); log
    rows are the mean over the ranks and rank 0 alone writes the checkpoint. group=None (or N = 1) is the
    single-process loop, bit for bit. A loss whose form changes over training (easy consistency tuning's shrinking
    interval, pipeline.consistency) has set_step(step), called before each optimisation step, resumed runs included.
    """
    device = torch.device(device)
    group = _sharded(group, settings)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    state = new_state(model, settings, device)
    net = training_network(model, settings, group)
    resume(state, checkpoints, settings.steps, device, group)
    resumed_from = state.step
    if group is None or group.is_main:  # the snapshots of a run resumed here; none when it tracks no profile
        posthoc.keep_snapshots_until(checkpoints.snapshots, state.step if state.posthoc else 0,
                                     settings.snapshot_every or 1)
    model.train()
    bar = tqdm(total=settings.steps, initial=state.step, desc="train", unit="step", disable=not hooks.progress,
               mininterval=1.0)
    try:
        set_step = getattr(loss_fn, "set_step", None)
        while state.step < settings.steps:
            if set_step is not None:
                set_step(state.step)
            batch, conds = draw_batch(data, settings, state.gen, device)
            optimisation_step(state, net, loss_fn, batch, conds, settings, group)
            _after_step(state, settings, checkpoints, hooks, device, group, bar)
    finally:
        bar.close()
    if state.step == 0:  # train.steps 0: the checkpoint (and snapshot) of the untrained state
        _snapshot(state, checkpoints, group)
        save_checkpoint(state, checkpoints, device, group)
    if settings.channels_last:  # the returned (and saved) weights are laid out like any other run's
        model.to(memory_format=torch.contiguous_format)
        state.ema.module.to(memory_format=torch.contiguous_format)
    return TrainResult(model, state.ema.module, state.rows, resumed_from, state.eval_rows)


def _after_step(state: TrainState, settings: TrainSettings, checkpoints: Checkpoints, hooks: Hooks,
                device: torch.device, group: Optional[Group], bar: tqdm) -> None:
    """The step's held-out row, loss row and checkpoint when due; then checkpoint and raise Preempted if asked."""
    evaluate_if_due(state, hooks)
    mean = log_if_due(state, settings, hooks.on_log, group)
    if mean is not None and not bar.disable:  # tqdm's bar shows steps/s and the time left; this adds images/s
        rate = bar.format_dict.get("rate") or 0.0
        bar.set_postfix({"loss": f"{mean:.4f}", "img/s": f"{rate * settings.batch_size:.0f}"}, refresh=False)
    if state.posthoc and (state.step % settings.snapshot_every == 0 or state.step == settings.steps):
        _snapshot(state, checkpoints, group)  # before the checkpoint: a resume never lacks a snapshot it passed
    saved = state.step % settings.checkpoint_every == 0 or state.step == settings.steps
    if saved:
        save_checkpoint(state, checkpoints, device, group)
    bar.update(1)
    if stop_requested(hooks.should_stop, state.step, settings.steps, group):
        if not saved:
            save_checkpoint(state, checkpoints, device, group)
        preempt(state.step, checkpoints.path, group)


def _snapshot(state: TrainState, checkpoints: Checkpoints, group: Optional[Group]) -> None:
    """Write the post-hoc EMA profiles' weights at this step to checkpoints.snapshots (rank 0; none tracked: no-op)."""
    if state.posthoc and (group is None or group.is_main):
        posthoc.save_snapshot(checkpoints.snapshots, state.step, state.posthoc_sigma_rels,
                              [averaged.module.state_dict() for averaged in state.posthoc])


def _sharded(group: Optional[Group], settings: TrainSettings) -> Optional[Group]:
    """`group` when it has several processes, else None (the single-process loop); refuses uneven shares."""
    if group is None or group.world_size <= 1:
        return None
    if (settings.batch_size // settings.accumulate) % group.world_size:
        raise ValueError(f"batch_size / accumulate ({settings.batch_size} / {settings.accumulate}) must be a multiple "
                         f"of the {group.world_size} processes: each rank takes an equal share of every micro-batch")
    return group
