"""The training loop: Adam, optional gradient clipping, EMA, checkpoints and resume.

EMA of the weights is NCSNv2 technique 5 (arXiv:2006.09011, sec. 3.5), kept with
torch.optim.swa_utils.AveragedModel; optionally with score_sde's warm-up of the decay (ema_multi_avg_fn).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline import io

LossFn = Callable[..., Tensor]
# (batch drawn from the data, generator) -> what the loss sees, e.g. pixels to model space with dequantisation
# and flips; its randomness comes from the training generator, after the batch indices.
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
# (step, EMA network) -> one row of held-out numbers (e.g. {"value": ..., "se": ...}), every eval_every steps.
Evaluator = Callable[[int, nn.Module], Mapping[str, float]]
CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class TrainSettings:
    """The knobs of the loop (train.* in params.yaml)."""

    steps: int
    batch_size: int
    lr: float
    grad_clip: Optional[float]
    ema_decay: float
    checkpoint_every: int
    log_every: int
    seed: int
    ema_warmup: bool = False


@dataclass
class TrainResult:
    """The trained network, its EMA copy, and the loss curve rows (step, mean loss since last row)."""

    model: nn.Module
    ema: nn.Module
    loss_rows: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0
    eval_rows: list[dict] = field(default_factory=list)


def ema_multi_avg_fn(decay: float, warmup: bool) -> Callable:
    """AveragedModel's multi_avg_fn: ema <- d ema + (1 - d) w with d = decay, or with warm-up
    d = min(decay, (1 + n) / (10 + n)) after n updates (score_sde's ExponentialMovingAverage, use_num_updates;
    TensorFlow's num_updates). Without warm-up a run of S steps keeps decay^S of the random initial weights
    (13 % for 2,000 steps at 0.999), which shrinks every prediction; the warm-up forgets it.
    """
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        if not torch.is_floating_point(ema_params[0]):  # integer buffers (counters) follow the model
            torch._foreach_copy_(ema_params, params)
            return
        # a tensor weight on the parameters' device: no host sync per step
        n = num_averaged.to(dtype=ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay))

    return update


def fingerprint(obj: Mapping[str, Any]) -> str:
    """A stable hash of everything that must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _load_compatible(path: Path, expected: str, steps: int) -> Optional[dict]:
    """The checkpoint at path if it was written by the same setup and is not past `steps`."""
    if not path.is_file():
        return None
    try:
        ckpt = io.load_torch(path)
    except Exception:  # unreadable: start over rather than crash
        return None
    if ckpt.get("fingerprint") != expected or int(ckpt["step"]) > steps:
        return None
    return ckpt


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    setup: Mapping[str, Any],
    on_log: Optional[Callable[[int, float], None]] = None,
    progress: bool = True,
    transform: Optional[BatchTransform] = None,
    device: torch.device | str = "cpu",
    evaluator: Optional[Evaluator] = None,
    eval_every: int = 0,
) -> TrainResult:
    """Train `model` on `data` (N, *D) with mini-batches drawn with replacement.

    Resumes from checkpoint_dir/last.pt when it was written for the same `setup` (model,
    method, noise scales, data, and every train.* key but steps and the logging cadence);
    a resumed run gives the same bits as an uninterrupted one. `data` stays where it is (uint8
    images on the CPU); each batch is transformed and moved to `device`, where the model lives.
    Every `eval_every` steps (0: never) `evaluator(step, ema_network)` adds a row to `eval_rows`.
    """
    model.to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(settings.ema_decay, settings.ema_warmup),
                        use_buffers=True)
    rows: list[tuple[int, float]] = []
    eval_rows: list[dict] = []
    step = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT
    expected = fingerprint(setup)
    ckpt = _load_compatible(ckpt_path, expected, settings.steps)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        rows = [(int(s), float(v)) for s, v in ckpt["loss_rows"].tolist()]
        eval_rows = [dict(r) for r in ckpt.get("eval_rows", [])]
        step = int(ckpt["step"])
    resumed_from = step

    def save() -> None:
        io.save_torch(ckpt_path, {
            "fingerprint": expected, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "ema": ema.state_dict(), "generator": gen.get_state(),
            "loss_rows": torch.tensor(rows, dtype=torch.float64).reshape(-1, 2), "eval_rows": eval_rows,
        })

    model.train()
    running, count = 0.0, 0
    bar = tqdm(total=settings.steps, initial=step, desc="train", disable=not progress, mininterval=1.0)
    while step < settings.steps:
        idx = torch.randint(len(data), (settings.batch_size,), generator=gen)
        batch = data[idx] if transform is None else transform(data[idx], gen)
        loss = loss_fn(model, batch.to(device), generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        ema.update_parameters(model)
        step += 1
        running += float(loss.detach())
        count += 1
        if eval_every and evaluator is not None and step % eval_every == 0:
            ema.module.eval()  # no dropout in the held-out numbers
            with torch.no_grad():
                eval_rows.append({"step": step, **evaluator(step, ema.module)})
            ema.module.train()
        if step % settings.log_every == 0 or step == settings.steps:
            rows.append((step, running / count))
            if on_log is not None:
                on_log(step, running / count)
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save()
        bar.update(1)
    bar.close()
    if step == 0 or (ckpt is None and settings.steps == 0):
        save()
    return TrainResult(model, ema.module, rows, resumed_from, eval_rows)


def image_batches(scaling: str, *, dequantize: bool = False, hflip: bool = False) -> BatchTransform:
    """The training transform of uint8 image batches (B, C, H, W): pixels to model space (pipeline.pixels), with
    uniform dequantisation (score_sde) and random horizontal flips (Ho et al. 2020, appendix B), drawn from the
    training generator: the dequantisation noise first, then one flip bit per example."""
    from pipeline.pixels import to_model

    def transform(x: Tensor, generator: torch.Generator) -> Tensor:
        out = to_model(x, scaling, dequantize=dequantize, generator=generator)
        if hflip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            out = torch.where(flip.reshape(-1, *([1] * (out.ndim - 1))).to(out.device), out.flip(-1), out)
        return out

    return transform


def held_out_evaluator(loss_fn: LossFn, loss_name: str, x: Tensor, *, transform: Optional[BatchTransform],
                       device: torch.device | str, seed: int, scaling: Optional[str]) -> tuple[Evaluator, str]:
    """The held-out number tracked during training (train.eval_every) and its unit.

    The training loss on held-out examples x (N, *D), with the same noise at every evaluation (generator
    seeded with `seed`), mean and standard error over the examples, per dimension. For the ELBO losses
    ("vlb": the discrete bound, "huang_elbo": Huang et al.'s) it is a negative log-likelihood bound: nats/dim
    on points, bits/dim on images (the discrete bound with its discretised decoder is already in bits of the
    pixels; Huang's bound is a density of dequantised data, so the offset of pipeline.pixels.bpd_offset is
    added), as sdeflow-light plots test bpd against iterations. Other losses report "loss/dim".
    """
    import math

    from pipeline.pixels import bpd_offset

    dim = x[0].numel()
    bound = loss_name in ("vlb", "huang_elbo")
    if bound and scaling is not None:
        unit, scale, offset = "bits/dim", 1.0 / (dim * math.log(2)), bpd_offset(scaling) if loss_name == "huang_elbo" else 0.0
    else:
        unit, scale, offset = ("nats/dim" if bound else "loss/dim"), 1.0 / dim, 0.0

    def evaluator(step: int, net: nn.Module) -> dict:
        gen = torch.Generator().manual_seed(seed)
        batch = x if transform is None else transform(x, gen)
        # the divergence losses turn gradients on for their divergence only (pipeline.losses)
        values = loss_fn(net, batch.to(device), generator=gen).detach().double().cpu() * scale + offset
        return {"value": float(values.mean()), "se": float(values.std() / math.sqrt(len(values)))}

    return evaluator, unit
