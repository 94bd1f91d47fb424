"""The training loop: Adam, optional gradient clipping, EMA, checkpoints and resume.

EMA of the weights is NCSNv2 technique 5 (arXiv:2006.09011, sec. 3.5), kept with
torch.optim.swa_utils.AveragedModel.
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


@dataclass
class TrainResult:
    """The trained network, its EMA copy, and the loss curve rows (step, mean loss since last row)."""

    model: nn.Module
    ema: nn.Module
    loss_rows: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0


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
) -> TrainResult:
    """Train `model` on `data` (N, *D) with mini-batches drawn with replacement.

    Resumes from checkpoint_dir/last.pt when it was written for the same `setup` (model,
    method, noise scales, data, and every train.* key but steps and the logging cadence);
    a resumed run gives the same bits as an uninterrupted one.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
    rows: list[tuple[int, float]] = []
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
        step = int(ckpt["step"])
    resumed_from = step

    def save() -> None:
        io.save_torch(ckpt_path, {
            "fingerprint": expected, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "ema": ema.state_dict(), "generator": gen.get_state(),
            "loss_rows": torch.tensor(rows, dtype=torch.float64).reshape(-1, 2),
        })

    model.train()
    running, count = 0.0, 0
    bar = tqdm(total=settings.steps, initial=step, desc="train", disable=not progress, mininterval=1.0)
    while step < settings.steps:
        idx = torch.randint(len(data), (settings.batch_size,), generator=gen)
        loss = loss_fn(model, data[idx], generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        ema.update_parameters(model)
        step += 1
        running += float(loss.detach())
        count += 1
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
    return TrainResult(model, ema.module, rows, resumed_from)
