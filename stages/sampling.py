"""What every sample-stage task starts from and shares: the loaded model and sampler (Loaded), the batching over
per-sample generators, the held-out items and the MLflow record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import defaults, io, models
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.errors import DataError
from pipeline.kinds import DataKind, kind_of
from pipeline.parameterization import clip_denoised
from pipeline.processes import Process
from pipeline.rng import SampleGenerators
from pipeline.tracking import StageRun
from stages.common import (FINAL_MODEL, NOISE_SCALES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT, data_record, process_of, resolve,
                           sampler_options)
from stages.launch import choose_device

# Grid times of the first batch kept for the trajectory figure ("x at 8 times").
TRAJECTORY_FRAMES = 8


@dataclass
class Loaded:
    """What every task of the stage starts from: the data record and kind, the process, the model and the sampler's
    options."""

    info: dict
    data: DataKind
    process: Process
    sampler: str
    device: torch.device
    model_kind: str
    fn: Callable
    clip: bool
    steps: Optional[int]
    options: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def score(self, fn: Callable) -> Callable:
        """fn, its x0_hat clipped to the data's range where sample.clip_denoised says so (outside any guidance: the
        guided x0_hat is the one clipped)."""
        return clip_denoised(fn, self.process, *self.data.value_range()) if self.clip else fn

    def to_model(self, data: np.ndarray) -> torch.Tensor:
        """Held-out items as stored in model space on the device."""
        return self.data.to_model(data, self.device)


def load(cfg: Config) -> Loaded:
    info, record, r = data_record(), io.read_json(NOISE_SCALES), resolve(cfg)
    process, sampler, device = process_of(record), r.plan.sampler, choose_device(cfg.train.device)
    model_kind, fn = models.load_model(FINAL_MODEL, process, device=device)
    clip = defaults.clip_denoised(cfg.sample.clip_denoised, sampler, model_kind, info)
    steps, options = sampler_options(r, process, record)
    return Loaded(info, kind_of(info, record.get("scaling")), process, sampler, device, model_kind, fn, clip, steps,
                  options)


def check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size or "
                                 "more sample.steps)")


def log_sample(cfg: Config, run: StageRun, m: Loaded, resolved: dict, nfe: int) -> None:
    run.log_params({"sample": cfg.sample.model_dump(mode="json"), "sampler": m.sampler, "clip_denoised": m.clip,
                    **resolved})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)
    run.log_artifact(TRAJECTORY_PLOT)


def held_out(n: int) -> np.ndarray:
    """The first n held-out test items, the known values of inpainting and the inputs of editing."""
    test = np.load(TEST)
    if len(test) < n:
        raise DataError(f"sample.n ({n}) is more than the {len(test)} held-out test items; lower sample.n")
    return test[:n]


def batched(m: Loaded, n: int, batch_size: int, seed: int, body: Callable,
             group: Optional[Group] = None) -> tuple[list[np.ndarray], int, list]:
    """body(rows, generators, record) over the batches of n items (per-sample generators; with a group, this rank's
    run of the batches): the outputs as stored, batch by batch, the largest nfe and the recorded trajectory of the
    batch that starts at item 0."""
    chunks, nfe, trajectory = [], 0, []
    starts = range(0, n, batch_size)
    if group is not None:
        starts = starts[group.rows(len(starts))]
    # samples per second and the time left over the whole run; each batch's walk shows its steps below it
    bar = tqdm(total=sum(min(batch_size, n - s) for s in starts), desc="samples", unit="sample",
               disable=group is not None and not group.is_main, mininterval=1.0)
    with torch.no_grad(), bar:
        for start in starts:
            rows = slice(start, min(start + batch_size, n))
            out = body(rows, SampleGenerators(seed, range(rows.start, rows.stop)),
                       TRAJECTORY_FRAMES if start == 0 else None)
            check_finite(out.x)
            chunks.append(m.data.to_output(out.x))
            trajectory = trajectory or [(t, x[:TRAJECTORY_FRAMES].cpu()) for t, x in out.trajectory]
            nfe = max(nfe, out.nfe)
            bar.update(rows.stop - rows.start)
    return chunks, nfe, trajectory
