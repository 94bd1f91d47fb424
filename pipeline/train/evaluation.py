"""What the training loop records and when, part (c): a loss row every log_every steps (and at the last), a
held-out row every eval_every steps from the EMA network, the held-out evaluator the train stage uses, and the CSV
text of both kinds of rows (the train stage's plots/train_loss.csv and plots/train_eval.csv)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pipeline.distributed import Group
from pipeline.guidance import label_index
from pipeline.train.settings import BatchTransform, Evaluator, Hooks, LossFn, TrainSettings
from pipeline.train.state import TrainState


def log_if_due(state: TrainState, settings: TrainSettings, on_log: Optional[Callable[[int, float], None]],
               group: Optional[Group]) -> Optional[float]:
    """At a row's step: the mean loss since the last row, appended to state.rows and given to on_log; else None."""
    if state.step % settings.log_every and state.step != settings.steps:
        return None
    # the one host sync, every log_every steps; with N ranks the mean of their means (equal shares)
    mean = (float(state.running) / state.count if group is None
            else float(group.sum(state.running)) / group.world_size / state.count)
    state.rows.append((state.step, mean))
    if on_log is not None:
        on_log(state.step, mean)
    state.running.zero_()
    state.count = 0
    return mean


def evaluate_if_due(state: TrainState, hooks: Hooks) -> None:
    """Every eval_every steps: the evaluator's row of the EMA network, appended to state.eval_rows."""
    if not hooks.eval_every or hooks.evaluator is None or state.step % hooks.eval_every:
        return
    net = state.ema.module
    net.eval()  # no dropout in the held-out numbers
    with torch.no_grad():
        state.eval_rows.append({"step": state.step, **hooks.evaluator(state.step, net)})
    net.train()


def held_out_evaluator(loss_fn: LossFn, loss_name: str, x: Tensor, *, transform: Optional[BatchTransform],
                       device: torch.device | str, seed: int, scaling: Optional[str],
                       labels: Optional[Tensor] = None) -> tuple[Evaluator, str]:
    """The held-out number tracked during training (train.eval_every) and its unit.

    The training loss on held-out examples x (N, *D), with the same noise at every evaluation (generator
    seeded with `seed`), mean and standard error over the examples, per dimension. For the ELBO losses
    ("vlb": the discrete bound, "huang_elbo": Huang et al.'s) it is a negative log-likelihood bound: nats/dim
    on points, bits/dim on images (the discrete bound with its discretised decoder is already in bits of the
    pixels; Huang's bound is a density of dequantised data, so the offset of pipeline.pixels.bpd_offset is
    added), as sdeflow-light plots test bpd against iterations. Other losses report "loss/dim".
    `labels` (N,): the examples' 0-based classes, given to a class-conditional network (no dropout).
    """
    from pipeline.pixels import bpd_offset

    dim = x[0].numel()
    bound = loss_name in ("vlb", "huang_elbo")
    if bound and scaling is not None:
        offset = bpd_offset(scaling) if loss_name == "huang_elbo" else 0.0
        unit, scale = "bits/dim", 1.0 / (dim * math.log(2))
    else:
        unit, scale, offset = ("nats/dim" if bound else "loss/dim"), 1.0 / dim, 0.0

    def evaluator(step: int, net: nn.Module) -> dict:
        gen = torch.Generator().manual_seed(seed)
        batch = x if transform is None else transform(x, gen)
        # the divergence losses turn gradients on for their divergence only (pipeline.losses)
        if labels is None:
            values = loss_fn(net, batch.to(device), generator=gen)
        else:
            values = loss_fn(net, batch.to(device), cond=label_index(labels).to(device), generator=gen)
        values = values.detach().double().cpu() * scale + offset
        return {"value": float(values.mean()), "se": float(values.std() / math.sqrt(len(values)))}

    return evaluator, unit


def loss_csv(rows: list[tuple[int, float]]) -> str:
    """The loss rows (step, mean loss) as CSV text: step,loss."""
    return "step,loss\n" + "".join(f"{s},{v:.8g}\n" for s, v in rows)


def eval_csv(rows: list[dict], unit: str) -> str:
    """The held-out rows ({"step", "value", "se"}) as CSV text: step,value,se,unit."""
    return "step,value,se,unit\n" + "".join(f"{r['step']},{r['value']:.8g},{r['se']:.8g},{unit}\n" for r in rows)
