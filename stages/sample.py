"""sample: draw samples from the final model with the method's sampler; writes samples.npz and the figures.

Sample i draws all its noise from its own generator seeded from (sample.seed, i) (pipeline.rng), so
the samples do not depend on sample.batch_size. Images are stored as the uint8 pixels a PNG holds.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import defaults, io, models, pixels, plots
from pipeline.config import Config
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw
from pipeline.tracking import StageRun
from stages.common import (MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT,
                           choose_device, data_record, main, plan_of, process_of, sampler_options)

# Grid points of the first batch kept for the trajectory figure ("x at 8 times").
TRAJECTORY_FRAMES = 8
GRID_IMAGES = 64


def sample_stage(cfg: Config, run: StageRun) -> None:
    s = cfg.sample
    info = data_record()
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    sampler = plan_of(cfg).sampler
    device = choose_device(cfg.train.device)
    model_kind, fn = models.load_model(MODEL, process, device=device)
    steps, options = sampler_options(cfg, process, record)
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, info)
    shape = tuple(info["shape"])
    scaling = record.get("scaling")
    chunks, nfe, trajectory = [], 0, []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            gens = SampleGenerators(s.seed, range(start, start + b))
            out = draw(sampler, model_kind, fn, process, (b, *shape), gens, steps, options, progress=True,
                       record=TRAJECTORY_FRAMES if start == 0 else None, device=device)
            if not torch.isfinite(out.x).all():
                raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size or "
                                         "more sample.steps)")
            chunks.append((pixels.to_pixels(out.x, scaling) if scaling else out.x.float()).cpu().numpy())
            trajectory = trajectory or [(t, x[:TRAJECTORY_FRAMES].cpu()) for t, x in out.trajectory]
            nfe = max(nfe, out.nfe)
    x = np.concatenate(chunks)
    io.save_npz(SAMPLES, x=x)
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
    run.log_params({"sample": s.model_dump(mode="json"), "sampler": sampler, "n": n, "batch_size": batch_size})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)
    run.log_artifact(TRAJECTORY_PLOT)


if __name__ == "__main__":
    main("sample", sample_stage)
