"""sample: draw samples from the final model with the method's sampler; writes samples.npz and the figures.

Sample i draws all its noise from its own generator seeded from (sample.seed, i) (pipeline.rng), so
the samples do not depend on sample.batch_size. Images are stored as the uint8 pixels a PNG holds.

sample.devices N > 1 shards the sampling over N processes under torchrun (stages.common.relaunch). The n samples are
cut into the batches one process would draw, samples [k b, (k + 1) b) for b = sample.batch_size, and rank r draws
the contiguous run of batches [r K / N, (r + 1) K / N) of the K batches; rank 0 gathers them in order and writes.
Every batch is then computed exactly as in one process, so the samples are byte-identical whatever N, for every
sampler (set sample.batch_size <= n / N to give every process work).

Across sample.batch_size the noise is the same (per-sample seeds), but two samplers couple the samples of a batch
and change with the batching: the PC sampler's Langevin corrector (its step size uses norms averaged over the batch,
as score_sde) and the ODE sampler's RK45 (one adaptive step size for the batch). The others change only by the
float rounding of the network on another number of rows (CPU GEMM kernels are chosen by the row count: float32
points may differ in their last bits; uint8 image pixels almost never do).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pipeline import defaults, io, models, pixels, plots
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.data import DataError
from pipeline.guidance import guided_score
from pipeline.parameterization import clip_denoised
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw
from pipeline.tracking import StageRun
from stages.common import (MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT,
                           choose_device, data_record, main, plan_of, process_of, sampler_options)

# Grid points of the first batch kept for the trajectory figure ("x at 8 times").
TRAJECTORY_FRAMES = 8
GRID_IMAGES = 64


def sample_stage(cfg: Config, run: StageRun, group: Optional[Group] = None) -> None:
    """The sample stage's body; with a `group` (torchrun, N > 1) one rank's shard of it, rank 0 gathering and
    writing."""
    s = cfg.sample
    info = data_record()
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    sampler = plan_of(cfg).sampler
    device = choose_device(cfg.train.device)
    model_kind, fn = models.load_model(MODEL, process, device=device)
    scaling = record.get("scaling")
    clip = defaults.clip_denoised(s.clip_denoised, sampler, model_kind, info)
    steps, options = sampler_options(cfg, process, record)
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, info)
    classes = _classes(cfg, n, info)
    shape = tuple(info["shape"])
    chunks, nfe, trajectory = [], 0, []
    starts = range(0, n, batch_size)  # the batches of one process
    if group is not None:  # this rank's run of them
        starts = starts[group.rows(len(starts))]
    with torch.no_grad():
        for start in starts:
            b = min(batch_size, n - start)
            gens = SampleGenerators(s.seed, range(start, start + b))
            batch_fn = fn if classes is None else guided_score(fn, classes[start:start + b].to(device), s.guidance)
            if clip:  # outside the guidance: the guided x0_hat is the one clipped
                batch_fn = clip_denoised(batch_fn, process, *pixels.pixel_range(scaling))
            out = draw(sampler, model_kind, batch_fn, process, (b, *shape), gens, steps, options,
                       progress=group is None or group.is_main,
                       record=TRAJECTORY_FRAMES if start == 0 else None, device=device)
            if not torch.isfinite(out.x).all():
                raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size or "
                                         "more sample.steps)")
            chunks.append((pixels.to_pixels(out.x, scaling) if scaling else out.x.float()).cpu().numpy())
            trajectory = trajectory or [(t, x[:TRAJECTORY_FRAMES].cpu()) for t, x in out.trajectory]
            nfe = max(nfe, out.nfe)
    if group is not None:
        x, nfe, trajectory = _gather(group, chunks, nfe, trajectory)
        if not group.is_main:
            return
    else:
        x = np.concatenate(chunks)
    io.save_npz(SAMPLES, x=x, **({} if classes is None else {"y": classes.numpy()}))
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": int(len(x))})
    title = f"{cfg.method.name}: {sampler}, nfe={nfe}"
    if info["kind"] == "images":
        plots.image_grid(SAMPLES_PLOT, x[:GRID_IMAGES], title)
        frames = [(t, pixels.to_pixels(v, scaling).numpy()) for t, v in trajectory]
        plots.image_trajectory(TRAJECTORY_PLOT, frames, f"{title}: x at {len(frames)} times")
    else:
        plots.scatter_samples(SAMPLES_PLOT, x, np.load(TEST)[: len(x)], title)
        plots.point_trajectory(TRAJECTORY_PLOT, [(t, v.numpy()) for t, v in trajectory],
                               f"{title}: x at {len(trajectory)} times")
    run.log_params({"sample": s.model_dump(mode="json"), "sampler": sampler, "clip_denoised": clip, "n": n,
                    "batch_size": batch_size})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)
    run.log_artifact(TRAJECTORY_PLOT)


def _classes(cfg: Config, n: int, info: dict) -> Optional[torch.Tensor]:
    """Each sample's 0-based class (n,) for a class-conditional model (sample.classes), else None."""
    if not cfg.method.conditional:
        return None
    try:
        return defaults.sample_classes(cfg.sample.classes, n, info["num_classes"])
    except ValueError as err:
        raise DataError(str(err)) from None


def _gather(group: Group, chunks: list[np.ndarray], nfe: int, trajectory: list) -> tuple[Optional[np.ndarray], int, list]:
    """Every rank's samples in rank order (the order of one process), the largest nfe and the trajectory of the
    batch that starts at sample 0, on rank 0; (None, nfe, trajectory) elsewhere."""
    parts = group.gather((chunks, nfe, trajectory))
    if parts is None:
        return None, nfe, trajectory
    x = np.concatenate([c for rank_chunks, _, _ in parts for c in rank_chunks])
    trajectory = next((tr for _, _, tr in parts if tr), [])
    return x, max(f for _, f, _ in parts), trajectory


if __name__ == "__main__":
    main("sample", sample_stage)
