"""State and resume, part (a) of the training loop: what a run carries from step to step (weights, Adam, the EMA,
the lr warm-up, the GradScaler, the training generator, the loss since the last row), the checkpoint that holds it
with the global RNGs dropout draws from, and resuming from that checkpoint bit for bit.

EMA of the weights is NCSNv2 technique 5 (arXiv:2006.09011, sec. 3.5), kept with
torch.optim.swa_utils.AveragedModel; optionally with score_sde's warm-up of the decay (ema_multi_avg_fn). Beside it,
the power-function EMAs of post-hoc EMA (pipeline.posthoc), AveragedModels too, whose snapshots go to
Checkpoints.snapshots.
The learning-rate warm-up is DDPM's and score_sde's lr * min(1, step / warmup) (Ho et al. 2020, appendix B:
5,000 steps; score_sde's optimization_manager); after it the lr may decay to zero over the run (lr_factor).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import io
from pipeline.distributed import Group
from pipeline.posthoc import gamma_of, power_multi_avg_fn
from pipeline.train.settings import TrainSettings

if TYPE_CHECKING:
    from pipeline.config import TrainParams

CHECKPOINT, SNAPSHOTS = "last.pt", "posthoc"
# train.* keys that leave the result alone (the cadence of logs, checkpoints and held-out rows, the device and
# its TF32 switch, like the device a property of the machine). The number of processes is checked apart
# (pipeline.train: another world size starts over, with a warning). The post-hoc EMA's profiles and snapshot
# cadence leave the weights alone too: resume compares them with the checkpoint's own instead, and other ones (or a
# checkpoint written before there were any) start over, so that the snapshots are a fresh run's.
NOT_FINGERPRINTED = {"steps", "checkpoint_every", "log_every", "device", "eval_every", "tf32", "devices", "posthoc"}
# Keys added after checkpoints existed that change the bits: fingerprinted only away from their defaults, so a
# checkpoint written before they existed still resumes.
LATER_KEYS = ("precision", "channels_last", "compile", "accumulate", "warmup", "lr_decay")


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


def warmup_factor(warmup: int) -> Callable[[int], float]:
    """LambdaLR's factor of update k = 0, 1, 2, ...: min(1, k / warmup), the linear warm-up of DDPM (Ho et al.
    2020, appendix B; their get_warmed_up_lr) and score_sde (optimization_manager), both of which give the first
    update lr 0: it only fills Adam's moments. The factor depends on k alone, so raising train.steps continues."""

    def factor(k: int) -> float:
        return min(1.0, k / warmup)

    return factor


# train.lr_decay (pipeline.names.LR_DECAYS) -> its factor d(u) at the fraction u = k / steps of the run done: 'linear'
# falls to zero at the end (Bergsma et al. 2025, arXiv:2502.15938), 'cosine' is SGDR without restarts (Loshchilov &
# Hutter 2017, eq. 5 with eta_min 0).
DECAYS: dict[str, Callable[[float], float]] = {
    "none": lambda u: 1.0,
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
}


def lr_factor(warmup: int, decay: str, steps: int) -> Callable[[int], float]:
    """LambdaLR's factor of update k = 0 .. steps - 1: the warm-up's (warmup_factor; 1 without one) times the
    decay's DECAYS[decay](k / steps). A decay depends on the run's length, so its checkpoints resume only into the
    same train.steps (resolved_fingerprint)."""
    ramp = warmup_factor(warmup) if warmup else (lambda k: 1.0)
    shape = DECAYS[decay]
    return lambda k: ramp(k) * shape(k / steps)


@dataclass(eq=False)
class TrainState:
    """Everything a checkpoint holds; `model` is the module itself (never the compiled or sharded wrapper).

    running: the loss summed since the last row, a float64 scalar on the device, read only at a row (no host sync
    per step; float64 sums of float32 losses give the bits of a Python float sum); count: the steps in it.
    rows: (step, mean loss) per row; eval_rows: {"step": step, **evaluator's row}; posthoc: one power-function EMA
    per posthoc_sigma_rels, snapshots every posthoc_every steps.
    """

    model: nn.Module
    opt: torch.optim.Optimizer
    ema: AveragedModel
    gen: torch.Generator
    sched: Optional[LambdaLR]
    scaler: Optional[torch.amp.GradScaler]
    running: Tensor
    count: int = 0
    step: int = 0
    rows: list[tuple[int, float]] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    posthoc: list[AveragedModel] = field(default_factory=list)
    posthoc_sigma_rels: tuple[float, ...] = ()
    posthoc_every: int = 0


def new_state(model: nn.Module, settings: TrainSettings, device: torch.device) -> TrainState:
    """Step 0 of a run of `model` (already on `device`): Adam, its lr warm-up, GradScaler, EMA and generator."""
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # constant lr: no scheduler at all, so the optimizer and its checkpoints are the constant-lr loop's
    scheduled = settings.warmup or settings.lr_decay != "none"
    sched = LambdaLR(opt, lr_factor(settings.warmup, settings.lr_decay, settings.steps)) if scheduled else None
    # fp16's narrow exponent underflows small gradients: scale the loss up, unscale before clipping and stepping
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(settings.ema_decay, settings.ema_warmup),
                        use_buffers=True)
    posthoc = [AveragedModel(model, multi_avg_fn=power_multi_avg_fn(gamma_of(s)), use_buffers=True)
               for s in settings.posthoc_sigma_rels]
    running = torch.zeros((), dtype=torch.float64, device=device)
    return TrainState(model, opt, ema, gen, sched, scaler, running, posthoc=posthoc,
                      posthoc_sigma_rels=tuple(float(s) for s in settings.posthoc_sigma_rels),
                      posthoc_every=settings.snapshot_every if settings.posthoc_sigma_rels else 0)


def fingerprint(obj: Mapping[str, Any]) -> str:
    """A stable hash of everything that must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprinted_train(t: TrainParams) -> dict:
    """The train.* keys a checkpoint must match to be resumed (the rest may change between runs)."""
    at_default = {k for k in LATER_KEYS if getattr(t, k) == type(t).model_fields[k].default}
    return t.model_dump(exclude=NOT_FINGERPRINTED | at_default)


def resolved_fingerprint(resolved: Mapping[str, Any], settings: TrainSettings) -> dict:
    """The resolved 'auto' train values (pipeline.defaults.train_settings) a checkpoint must match, for a run with
    `settings`: all but the snapshot cadence, which leaves the weights alone, and the length, so that a run may
    continue to more steps; unless the lr decays: then the decay and the length too, since the schedule is a
    function of it (another train.steps retrains instead of resuming). At a constant lr the fingerprint is the one
    checkpoints had before train.lr_decay existed."""
    out = {k: v for k, v in resolved.items() if k not in ("snapshot_every", "lr_decay")} | {"steps": None}
    return out if settings.lr_decay == "none" else out | {"lr_decay": settings.lr_decay, "steps": settings.steps}


@dataclass(frozen=True)
class Checkpoints:
    """Where a run's checkpoint lives (directory/last.pt) and the setup it must have been written for to be
    resumed: model, method, noise scales, data, and every train.* key but steps and the logging cadence."""

    directory: Path
    setup: Mapping[str, Any]

    @property
    def path(self) -> Path:
        return Path(self.directory) / CHECKPOINT

    @property
    def snapshots(self) -> Path:
        """The post-hoc EMA snapshots of the run the checkpoint belongs to (pipeline.posthoc)."""
        return Path(self.directory) / SNAPSHOTS

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.setup)


def _posthoc_key(sigma_rels, every) -> tuple:
    """What a checkpoint's post-hoc EMA must match: its profiles and, when it has any, their snapshot cadence."""
    sigma_rels = tuple(float(s) for s in sigma_rels)
    return sigma_rels, int(every) if sigma_rels else 0


def _global_rng(device: torch.device) -> dict:
    """The global RNG states dropout draws from (the CPU's, and the CUDA device's): part of an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_global_rng(state: Mapping[str, Tensor], device: torch.device) -> None:
    """Put the global RNGs back where a checkpoint left them (a run resumed on another device keeps its own)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_compatible(path: Path, expected: str, steps: int, world_size: int = 1, warn: bool = True,
                     posthoc: tuple = ((), 0)) -> Optional[dict]:
    """The checkpoint at path if it was written by the same setup, with as many processes, is not past `steps` and
    tracks the same post-hoc EMA profiles with the same snapshot cadence (`posthoc`: (sigma_rels, snapshot_every);
    a checkpoint written without profiles has none).

    A checkpoint of another world size is not resumed: the ranks' global RNGs and partial loss sums do not map onto
    another number of processes, and a run stitched from two world sizes could not be replayed. The run starts
    over, with a warning saying why (checkpoints from before several processes have no world size: 1)."""
    if not path.is_file():
        return None
    try:
        ckpt = io.load_torch(path)
    except Exception:  # unreadable: start over rather than crash
        return None
    if ckpt.get("fingerprint") != expected or int(ckpt["step"]) > steps:
        return None
    if _posthoc_key(ckpt.get("posthoc_sigma_rels", ()), ckpt.get("posthoc_every", 0)) != _posthoc_key(*posthoc):
        return None  # other profiles or another cadence: the averages and the snapshots start over
    written = int(ckpt.get("world_size", 1))
    if written != world_size:
        if warn:  # stacklevel 4: the warning names the line that called pipeline.train.train
            warnings.warn(f"{path} was written by {written} process(es) at step {int(ckpt['step'])} and this run has "
                          f"{world_size} (train.devices): it cannot be resumed bit for bit with another number of "
                          f"processes, so training starts over from step 0 and overwrites it (set train.devices: "
                          f"{written} to resume it instead)", stacklevel=4)
        return None
    return ckpt


def resume(state: TrainState, checkpoints: Checkpoints, steps: int, device: torch.device,
           group: Optional[Group]) -> None:
    """Load the checkpoint into `state` when it fits this run (see _load_compatible), else leave step 0."""
    world_size = 1 if group is None else group.world_size
    ckpt = _load_compatible(checkpoints.path, checkpoints.fingerprint, steps, world_size,
                            warn=group is None or group.is_main,
                            posthoc=(state.posthoc_sigma_rels, state.posthoc_every))
    if ckpt is None:
        return
    state.model.load_state_dict(ckpt["model"])
    state.opt.load_state_dict(ckpt["optimizer"])
    state.ema.load_state_dict(ckpt["ema"])
    for averaged, saved in zip(state.posthoc, ckpt.get("posthoc", [])):
        averaged.load_state_dict(saved)
    state.gen.set_state(ckpt["generator"])
    if state.sched is not None:
        state.sched.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:  # checkpoints from before preemption support lack the partial sum and dropout's RNG
        own = ckpt["ranks"][group.rank] if group is not None else ckpt  # each rank's own RNG and partial sum
        _restore_global_rng(own["rng"], device)
        state.running.copy_(own["running"])
        state.count = int(ckpt["count"])
    state.rows = [(int(s), float(v)) for s, v in ckpt["loss_rows"].tolist()]
    state.eval_rows = [dict(r) for r in ckpt.get("eval_rows", [])]
    state.step = int(ckpt["step"])


def save_checkpoint(state: TrainState, checkpoints: Checkpoints, device: torch.device,
                    group: Optional[Group]) -> None:
    """Write `state` to checkpoints.path; with several processes rank 0 writes every rank's RNG and partial sum."""
    # a collective: every rank must call it, also those that write nothing
    ranks = group.gather({"rng": _global_rng(device), "running": state.running.cpu()}) if group is not None else None
    if group is not None and not group.is_main:
        return
    out = {
        "fingerprint": checkpoints.fingerprint, "step": state.step, "model": state.model.state_dict(),
        "optimizer": state.opt.state_dict(), "ema": state.ema.state_dict(), "generator": state.gen.get_state(),
        "loss_rows": torch.tensor(state.rows, dtype=torch.float64).reshape(-1, 2), "eval_rows": state.eval_rows,
        "running": state.running.cpu(), "count": state.count, "rng": _global_rng(device),
    }
    if state.sched is not None:
        out["scheduler"] = state.sched.state_dict()
    if state.scaler is not None:
        out["scaler"] = state.scaler.state_dict()
    if state.posthoc:  # only then: a checkpoint without profiles keeps the keys it always had
        out["posthoc"] = [averaged.state_dict() for averaged in state.posthoc]
        out["posthoc_sigma_rels"] = list(state.posthoc_sigma_rels)
        out["posthoc_every"] = state.posthoc_every
    if group is not None:
        out.update(world_size=group.world_size, ranks=ranks)
    io.save_torch(checkpoints.path, out)
