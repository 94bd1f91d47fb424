"""One optimisation step, part (b) of the training loop: draw the global batch, run its micro-batches through the
loss under autocast, average the ranks' gradients, unscale and clip them, then Adam, the lr warm-up and the EMAs.

The training generator draws, in this order: the batch_size indices (with replacement), the transform's randomness,
the label dropout (with labels only), then each micro-batch's loss noise, micro-batch after micro-batch. Every knob
at its default (fp32, accumulate 1, warmup 0, no compile, contiguous, one process) is the plain loop, bit for bit.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn

from pipeline.distributed import Group, ShardRows
from pipeline.guidance import drop_labels, label_index
from pipeline.train.settings import PRECISIONS, LossFn, TrainData, TrainSettings
from pipeline.train.state import TrainState


def autocast(device_type: str, precision: str) -> ContextManager:
    """The context of the forward pass and loss: none for fp32 (the plain loop, bit for bit), else
    torch.autocast to bf16 or fp16 on the device's type (matmuls and convolutions in half precision,
    reductions and pointwise maths as autocast's op lists decide)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def micro_batches(batch: Tensor, accumulate: int) -> tuple[Tensor, ...]:
    """The global batch (B, *D) as `accumulate` equal micro-batches (B / accumulate, *D), in order."""
    return (batch,) if accumulate == 1 else batch.chunk(accumulate)


def to_device(batch: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """A CPU batch (B, *D) on `device`. On CUDA it goes through pinned memory without blocking the host, so the
    copy is queued behind the previous step's kernels instead of waiting for them; images (B, C, H, W) are
    made channels-last when asked (faster convolutions with tensor cores, the model is converted too)."""
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    if channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def training_network(model: nn.Module, settings: TrainSettings, group: Optional[Group]) -> nn.Module:
    """What the loss calls: `model`, compiled when asked, and with several processes run on this rank's rows."""
    # the compiled module shares `model`'s parameters; the optimizer, EMA and state_dicts use `model` itself, so
    # the saved keys have no `_orig_mod.` prefix
    net = torch.compile(model, backend=settings.compile_backend) if settings.compile else model
    if group is not None:  # the loss sees the whole micro-batch (its noise as in one process), the network
        net = ShardRows(net, group.rank, group.world_size)  # this rank's rows
    return net


def draw_batch(data: TrainData, settings: TrainSettings, gen: torch.Generator, device: torch.device
               ) -> tuple[Tensor, tuple[Optional[Tensor], ...]]:
    """The step's global batch (B, *D) on `device` and each micro-batch's label indices (B / accumulate,), or None
    each without labels; dropped labels are the null label (Ho & Salimans 2022, Algorithm 1)."""
    idx = torch.randint(len(data.x), (settings.batch_size,), generator=gen)
    batch = data.x[idx] if data.transform is None else data.transform(data.x[idx], gen)
    batch = to_device(batch, device, settings.channels_last)
    if data.labels is None:  # draws nothing more: the unconditional loop, bit for bit
        return batch, (None,) * settings.accumulate
    cond = drop_labels(label_index(data.labels[idx]), data.label_dropout, gen).to(device)
    return batch, micro_batches(cond, settings.accumulate)


def optimisation_step(state: TrainState, net: nn.Module, loss_fn: LossFn, batch: Tensor,
                      conds: tuple[Optional[Tensor], ...], settings: TrainSettings, group: Optional[Group]) -> None:
    """One update of `state` on the global batch (B, *D): gradients of its mean loss, then Adam and the EMA."""
    state.opt.zero_grad(set_to_none=True)
    for micro, cond in zip(micro_batches(batch, settings.accumulate), conds):
        _backward(state, net, loss_fn, micro, cond, settings, group)
    _apply_gradients(state, settings, group)
    state.ema.update_parameters(state.model)
    for averaged in state.posthoc:
        averaged.update_parameters(state.model)
    state.step += 1
    state.count += 1


def _backward(state: TrainState, net: nn.Module, loss_fn: LossFn, micro: Tensor, cond: Optional[Tensor],
              settings: TrainSettings, group: Optional[Group]) -> None:
    """Backpropagate one micro-batch's (B / accumulate, *D) share of the batch's mean loss; add it to running."""
    with autocast(micro.device.type, settings.precision):
        per_example = (loss_fn(net, micro, generator=state.gen) if cond is None
                       else loss_fn(net, micro, cond=cond, generator=state.gen))
    if group is not None:  # this rank's rows; the other rows are the zero outputs of ShardRows
        per_example = per_example[group.rows(len(per_example))]
    loss = per_example.float().mean()  # float32 whatever autocast computed it in
    if settings.accumulate > 1:  # equal micro-batches: the summed gradients are the batch mean's
        loss = loss / settings.accumulate
    (loss if state.scaler is None else state.scaler.scale(loss)).backward()
    state.running += loss.detach()


def _apply_gradients(state: TrainState, settings: TrainSettings, group: Optional[Group]) -> None:
    """Average the ranks' gradients, unscale and clip them, step Adam and the lr warm-up."""
    if group is not None:  # the mean of the ranks' gradients is the gradient of the global batch's mean loss
        group.average_gradients(state.model.parameters())
    if state.scaler is not None and settings.grad_clip is not None:
        state.scaler.unscale_(state.opt)  # clip the true gradients, not the scaled ones
    if settings.grad_clip is not None:
        nn.utils.clip_grad_norm_(state.model.parameters(), settings.grad_clip)
    if state.scaler is None:
        state.opt.step()
    else:  # skips the step when a gradient overflowed, and adapts the scale
        state.scaler.step(state.opt)
        state.scaler.update()
    if state.sched is not None:
        with warnings.catch_warnings():  # the schedule counts steps, also those the GradScaler skipped
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
            state.sched.step()
