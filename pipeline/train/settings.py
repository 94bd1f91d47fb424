"""What the training loop (pipeline.train) is given: its knobs (TrainSettings), the data it draws batches from
(TrainData) and the caller's hooks into it (Hooks); where its checkpoint lives is pipeline.train.state.Checkpoints.
check_train refuses the train.* values that params validation cannot see (they depend on the data and the processes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from pipeline.errors import DataError
from pipeline.names import LR_DECAYS

if TYPE_CHECKING:
    from pipeline.config import TrainParams

LossFn = Callable[..., Tensor]
# (batch drawn from the data, generator) -> what the loss sees, e.g. pixels to model space with dequantisation
# and flips; its randomness comes from the training generator, after the batch indices.
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
# (step, EMA network) -> one row of held-out numbers (e.g. {"value": ..., "se": ...}), every eval_every steps.
Evaluator = Callable[[int, nn.Module], Mapping[str, float]]
# train.precision -> the autocast dtype (None: no autocast at all, the plain fp32 loop).
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Losses that differentiate the network inside the loss (the divergence of ism, ssm and Huang's ELBO, with
# create_graph) need a double backward, which torch.compile's AOTAutograd graphs refuse (torch 2.14).
NO_COMPILE_LOSSES = ("ism", "ssm", "huang_elbo")


def check_train(t: TrainParams, batch_size: int, loss: str, world_size: int = 1) -> None:
    """Refuse, before any training, what params validation could not see: an 'auto' batch size that
    train.accumulate (times the processes) does not divide, and torch.compile with a loss it cannot train through."""
    if batch_size % t.accumulate:
        raise DataError(f"train.accumulate ({t.accumulate}) must divide train.batch_size ({batch_size}, resolved "
                        f"from auto for this data set): each step splits its batch into equal micro-batches")
    if batch_size % (t.accumulate * world_size):
        raise DataError(f"train.batch_size ({batch_size}) must be a multiple of train.devices x train.accumulate "
                        f"({world_size} x {t.accumulate}): each of the {world_size} processes takes an equal share "
                        f"of every micro-batch")
    if t.compile and loss in NO_COMPILE_LOSSES:
        raise DataError(f"train.compile: the {loss} loss differentiates the network inside the loss (a divergence), "
                        f"and torch.compile cannot train through that double backward; set train.compile: false")


@dataclass(frozen=True)
class TrainSettings:
    """The knobs of the loop (train.* in params.yaml; compile_backend is torch.compile's, tests pick a light one).

    precision: autocast dtype of the forward pass and loss ('fp32': none; 'fp16' with a GradScaler);
    accumulate: micro-batches per step (batch_size must divide evenly); warmup: steps of linear lr warm-up;
    lr_decay: the lr's decay over the run after it (pipeline.names.LR_DECAYS; pipeline.train.state.lr_factor);
    posthoc_sigma_rels: the power-function EMAs tracked for post-hoc EMA (pipeline.posthoc; () none), their
    snapshots written every snapshot_every steps and at the last step.
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
    lr_decay: str = "none"
    compile_backend: str = "inductor"
    posthoc_sigma_rels: tuple[float, ...] = ()
    snapshot_every: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.accumulate "
                             f"({self.accumulate}): each step splits its batch into accumulate equal micro-batches")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if self.posthoc_sigma_rels and self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1 with post-hoc EMA profiles, got {self.snapshot_every}")


@dataclass(frozen=True, eq=False)
class TrainData:
    """The training examples x (N, *D) and how a step's batch is made from them.

    x stays where it is (uint8 images on the CPU); each batch is transformed, then moved to the device.
    labels (N,): 0-based classes for a class-conditional network, each dropped to the null label with probability
    label_dropout (Ho & Salimans 2022, Algorithm 1); None trains the unconditional network.
    """

    x: Tensor
    transform: Optional[BatchTransform] = None
    labels: Optional[Tensor] = None
    label_dropout: float = 0.0


@dataclass(frozen=True)
class Hooks:
    """The caller's view into the loop; none of it changes the bits of the run.

    on_log(step, mean loss) at each loss row; evaluator(step, EMA network) every eval_every steps (0: never), its
    row kept in TrainResult.eval_rows; should_stop() once per step (True: checkpoint and raise Preempted);
    progress: a tqdm bar. With several processes, the caller gives on_log and evaluator to rank 0 only.
    """

    on_log: Optional[Callable[[int, float], None]] = None
    evaluator: Optional[Evaluator] = None
    eval_every: int = 0
    should_stop: Optional[Callable[[], bool]] = None
    progress: bool = True


def settings_from(train: Any, resolved: Mapping[str, Any], seed: int, posthoc: bool = True) -> TrainSettings:
    """TrainSettings from the train.* section (`train`: pipeline.config's TrainParams) and its resolved 'auto's
    (pipeline.defaults.train_settings); posthoc False keeps no post-hoc EMA profiles (a reflow's training)."""
    t = train
    return TrainSettings(resolved["steps"], resolved["batch_size"], resolved["lr"], t.grad_clip, t.ema_decay,
                         t.checkpoint_every, t.log_every, seed, ema_warmup=resolved["ema_warmup"],
                         precision=resolved["precision"], channels_last=t.channels_last, compile=t.compile,
                         accumulate=t.accumulate, warmup=t.warmup, lr_decay=resolved["lr_decay"],
                         posthoc_sigma_rels=tuple(t.posthoc.sigma_rels) if posthoc else (),
                         snapshot_every=resolved["snapshot_every"])
