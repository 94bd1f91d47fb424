"""The training loop: Adam, optional gradient clipping, EMA, checkpoints and resume; mixed precision, gradient
accumulation, learning-rate warm-up, channels-last and torch.compile for GPUs; preemption (should_stop); several
processes (a pipeline.distributed.Group: each rank trains on its rows of every global batch, see that module).

EMA of the weights is NCSNv2 technique 5 (arXiv:2006.09011, sec. 3.5), kept with
torch.optim.swa_utils.AveragedModel; optionally with score_sde's warm-up of the decay (ema_multi_avg_fn).
The learning-rate warm-up is DDPM's and score_sde's lr * min(1, step / warmup) (Ho et al. 2020, appendix B:
5,000 steps; score_sde's optimization_manager). Every knob defaults to the plain fp32 loop, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline import io
from pipeline.distributed import Group, ShardRows
from pipeline.guidance import drop_labels, label_index

LossFn = Callable[..., Tensor]
# (batch drawn from the data, generator) -> what the loss sees, e.g. pixels to model space with dequantisation
# and flips; its randomness comes from the training generator, after the batch indices.
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
# (step, EMA network) -> one row of held-out numbers (e.g. {"value": ..., "se": ...}), every eval_every steps.
Evaluator = Callable[[int, nn.Module], Mapping[str, float]]
CHECKPOINT = "last.pt"
# train.precision -> the autocast dtype (None: no autocast at all, the plain fp32 loop).
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Losses that differentiate the network inside the loss (the divergence of ism, ssm and Huang's ELBO, with
# create_graph) need a double backward, which torch.compile's AOTAutograd graphs refuse (torch 2.14).
NO_COMPILE_LOSSES = ("ism", "ssm", "huang_elbo")


class Preempted(Exception):
    """Training stopped at `step` because should_stop() asked it to; `checkpoint` resumes it exactly."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"preempted at step {step}; the checkpoint {checkpoint} resumes the run")
        self.step, self.checkpoint = step, checkpoint


@dataclass(frozen=True)
class TrainSettings:
    """The knobs of the loop (train.* in params.yaml; compile_backend is torch.compile's, tests pick a light one).

    precision: autocast dtype of the forward pass and loss ('fp32': none; 'fp16' with a GradScaler);
    accumulate: micro-batches per step (batch_size must divide evenly); warmup: steps of linear lr warm-up.
    """

    steps: int
    batch_size: int
    lr: float
    grad_clip: Optional[float]
    ema_decay: float
    checkpoint_every: int
    log_every: int
    seed: int
    ema_warmup: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    accumulate: int = 1
    warmup: int = 0
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.accumulate "
                             f"({self.accumulate}): each step splits its batch into accumulate equal micro-batches")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


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


def warmup_factor(warmup: int) -> Callable[[int], float]:
    """LambdaLR's factor of update k = 0, 1, 2, ...: min(1, k / warmup), the linear warm-up of DDPM (Ho et al.
    2020, appendix B; their get_warmed_up_lr) and score_sde (optimization_manager), both of which give the first
    update lr 0: it only fills Adam's moments. The factor depends on k alone, so raising train.steps continues."""

    def factor(k: int) -> float:
        return min(1.0, k / warmup)

    return factor


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


def fingerprint(obj: Mapping[str, Any]) -> str:
    """A stable hash of everything that must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _load_compatible(path: Path, expected: str, steps: int, world_size: int = 1, warn: bool = True
                     ) -> Optional[dict]:
    """The checkpoint at path if it was written by the same setup, with as many processes, and is not past `steps`.

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
    written = int(ckpt.get("world_size", 1))
    if written != world_size:
        if warn:
            warnings.warn(f"{path} was written by {written} process(es) at step {int(ckpt['step'])} and this run has "
                          f"{world_size} (train.devices): it cannot be resumed bit for bit with another number of "
                          f"processes, so training starts over from step 0 and overwrites it (set train.devices: "
                          f"{written} to resume it instead)", stacklevel=3)
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
    should_stop: Optional[Callable[[], bool]] = None,
    group: Optional[Group] = None,
    labels: Optional[Tensor] = None,
    label_dropout: float = 0.0,
) -> TrainResult:
    """Train `model` on `data` (N, *D) with mini-batches drawn with replacement.

    Resumes from checkpoint_dir/last.pt when it was written for the same `setup` (model,
    method, noise scales, data, and every train.* key but steps and the logging cadence);
    a resumed run gives the same bits as an uninterrupted one. `data` stays where it is (uint8
    images on the CPU); each batch is transformed and moved to `device`, where the model lives.
    Every `eval_every` steps (0: never) `evaluator(step, ema_network)` adds a row to `eval_rows`.

    Each step draws its batch_size indices and transforms the batch with the training generator, then runs
    `settings.accumulate` micro-batches through the loss (each drawing its own noise, in order) before one
    optimizer step. `should_stop()` is asked once per step, after the optimizer step, the EMA update and the
    step's evaluation, loss row and checkpoint; when it answers True, a checkpoint at this step (with the
    partial loss sum, so the resumed run writes the same rows) is written and Preempted is raised.

    With a `group` of N > 1 processes, every rank draws the same global batch and noise, evaluates the network on its
    rows of each micro-batch (pipeline.distributed) and the gradients are averaged before the optimizer step, so the
    run follows the single-process one up to float reductions; batch_size / accumulate must be a multiple of N.
    The ranks agree on should_stop (any rank's SIGTERM stops all at the same step), log rows are the mean over the
    ranks, and rank 0 alone writes the checkpoint, which holds the world size and every rank's global RNG and
    partial loss sum. `evaluator` and `on_log` are the caller's to give to rank 0 only. group=None (or N = 1) is the
    single-process loop, bit for bit.

    `labels` (N,) 0-based classes of `data` train a class-conditional network (Ho & Salimans 2022, Algorithm 1):
    after the batch transform, each example's label index (pipeline.guidance) is replaced by the null label with
    probability `label_dropout` (one uniform draw per example from the training generator) and given to the loss
    as `cond`. labels=None draws nothing more: the unconditional loop, bit for bit.
    """
    device = torch.device(device)
    sharded = group is not None and group.world_size > 1
    if sharded and (settings.batch_size // settings.accumulate) % group.world_size:
        raise ValueError(f"batch_size / accumulate ({settings.batch_size} / {settings.accumulate}) must be a multiple "
                         f"of the {group.world_size} processes: each rank takes an equal share of every micro-batch")
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # warmup 0: no scheduler at all, so the optimizer and its checkpoints are the constant-lr loop's
    sched = LambdaLR(opt, warmup_factor(settings.warmup)) if settings.warmup else None
    # fp16's narrow exponent underflows small gradients: scale the loss up, unscale before clipping and stepping
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(settings.ema_decay, settings.ema_warmup),
                        use_buffers=True)
    # the compiled module shares `model`'s parameters; the optimizer, EMA and state_dicts use `model` itself, so
    # the saved keys have no `_orig_mod.` prefix
    net = torch.compile(model, backend=settings.compile_backend) if settings.compile else model
    if sharded:  # the loss sees the whole micro-batch (its noise as in one process), the network this rank's rows
        net = ShardRows(net, group.rank, group.world_size)
    rows: list[tuple[int, float]] = []
    eval_rows: list[dict] = []
    step = 0
    # The loss since the last row, summed on the device in float64 and read only at log_every (no host sync per
    # step); float64 sums of float32 losses are the bits of the Python float sum the loop used to keep.
    running = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT
    expected = fingerprint(setup)
    world_size = group.world_size if sharded else 1
    ckpt = _load_compatible(ckpt_path, expected, settings.steps, world_size, warn=not sharded or group.is_main)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:  # checkpoints from before preemption support lack the partial sum and dropout's RNG
            own = ckpt["ranks"][group.rank] if sharded else ckpt  # each rank's own RNG and partial sum
            _restore_global_rng(own["rng"], device)
            running.copy_(own["running"])
            count = int(ckpt["count"])
        rows = [(int(s), float(v)) for s, v in ckpt["loss_rows"].tolist()]
        eval_rows = [dict(r) for r in ckpt.get("eval_rows", [])]
        step = int(ckpt["step"])
    resumed_from = step

    def save() -> None:
        ranks = group.gather({"rng": _global_rng(device), "running": running.cpu()}) if sharded else None
        if sharded and not group.is_main:
            return
        state = {
            "fingerprint": expected, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "ema": ema.state_dict(), "generator": gen.get_state(),
            "loss_rows": torch.tensor(rows, dtype=torch.float64).reshape(-1, 2), "eval_rows": eval_rows,
            "running": running.cpu(), "count": count, "rng": _global_rng(device),
        }
        if sched is not None:
            state["scheduler"] = sched.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if sharded:
            state.update(world_size=group.world_size, ranks=ranks)
        io.save_torch(ckpt_path, state)

    model.train()
    bar = tqdm(total=settings.steps, initial=step, desc="train", disable=not progress, mininterval=1.0)
    try:
        while step < settings.steps:
            idx = torch.randint(len(data), (settings.batch_size,), generator=gen)
            batch = data[idx] if transform is None else transform(data[idx], gen)
            batch = to_device(batch, device, settings.channels_last)
            conds = (None,) * settings.accumulate if labels is None else micro_batches(
                drop_labels(label_index(labels[idx]), label_dropout, gen).to(device), settings.accumulate)
            opt.zero_grad(set_to_none=True)
            for micro, cond in zip(micro_batches(batch, settings.accumulate), conds):
                with autocast(device.type, settings.precision):
                    per_example = (loss_fn(net, micro, generator=gen) if cond is None
                                   else loss_fn(net, micro, cond=cond, generator=gen))
                if sharded:  # this rank's rows; the other rows are the zero outputs of ShardRows
                    per_example = per_example[group.rows(len(per_example))]
                loss = per_example.float().mean()  # float32 whatever autocast computed it in
                if settings.accumulate > 1:  # equal micro-batches: the summed gradients are the batch mean's
                    loss = loss / settings.accumulate
                (loss if scaler is None else scaler.scale(loss)).backward()
                running += loss.detach()
            if sharded:  # the mean of the ranks' gradients is the gradient of the global batch's mean loss
                group.average_gradients(model.parameters())
            if scaler is not None and settings.grad_clip is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            if settings.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            if scaler is None:
                opt.step()
            else:  # skips the step when a gradient overflowed, and adapts the scale
                scaler.step(opt)
                scaler.update()
            if sched is not None:
                with warnings.catch_warnings():  # the schedule counts steps, also those the GradScaler skipped
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    sched.step()
            ema.update_parameters(model)
            step += 1
            count += 1
            if eval_every and evaluator is not None and step % eval_every == 0:
                ema.module.eval()  # no dropout in the held-out numbers
                with torch.no_grad():
                    eval_rows.append({"step": step, **evaluator(step, ema.module)})
                ema.module.train()
            if step % settings.log_every == 0 or step == settings.steps:
                # the one host sync, every log_every steps; with N ranks the mean of their means (equal shares)
                mean = float(running) / count if not sharded else float(group.sum(running)) / group.world_size / count
                rows.append((step, mean))
                if on_log is not None:
                    on_log(step, mean)
                bar.set_postfix(loss=f"{mean:.4f}")
                running.zero_()
                count = 0
            saved = step % settings.checkpoint_every == 0 or step == settings.steps
            if saved:
                save()
            bar.update(1)
            if should_stop is not None and step < settings.steps and _agreed(should_stop(), group if sharded else None):
                if not saved:
                    save()
                if sharded:  # nobody exits (and torchrun stops nobody) before rank 0 has written the checkpoint
                    group.barrier()
                raise Preempted(step, ckpt_path)
    finally:
        bar.close()
    if step == 0 or (ckpt is None and settings.steps == 0):
        save()
    if settings.channels_last:  # the returned (and saved) weights are laid out like any other run's
        model.to(memory_format=torch.contiguous_format)
        ema.module.to(memory_format=torch.contiguous_format)
    return TrainResult(model, ema.module, rows, resumed_from, eval_rows)


def _agreed(stop: bool, group: Optional[Group]) -> bool:
    """should_stop's answer, the same on every rank: one SIGTERM seen by any rank stops them all at this step."""
    return stop if group is None else group.any(stop)


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
        if labels is None:
            values = loss_fn(net, batch.to(device), generator=gen)
        else:
            values = loss_fn(net, batch.to(device), cond=label_index(labels).to(device), generator=gen)
        values = values.detach().double().cpu() * scale + offset
        return {"value": float(values.mean()), "se": float(values.std() / math.sqrt(len(values)))}

    return evaluator, unit
