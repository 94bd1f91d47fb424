"""sample: annealed Langevin dynamics with the final model; writes samples.npz and a scatter figure."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, models, plots
from pipeline.config import Config
from pipeline.noise import NoiseScales
from pipeline.processes import NoiseScaleProcess
from pipeline.samplers.langevin import annealed_langevin
from pipeline.tracking import StageRun
from stages.common import MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAIN, main


def sample_stage(cfg: Config, run: StageRun) -> None:
    s = cfg.sample
    scales = NoiseScales.from_json(io.read_json(NOISE_SCALES))
    process = NoiseScaleProcess(scales.sigmas)
    score_fn = models.load_score_fn(MODEL, process)
    shape = np.load(TRAIN, mmap_mode="r").shape[1:]
    gen = torch.Generator().manual_seed(s.seed)
    chunks, nfe = [], 0
    with torch.no_grad():
        for start in range(0, s.n, s.batch_size):
            b = min(s.batch_size, s.n - start)
            out = annealed_langevin(score_fn, process, (b, *shape), scales.step_size, scales.steps_per_scale, gen,
                                    denoise=s.denoise, progress=True)
            chunks.append(out.x.numpy())
            nfe = out.nfe
    x = np.concatenate(chunks).astype(np.float32)
    if not np.isfinite(x).all():
        raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size)")
    io.save_npz(SAMPLES, x=x)
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": int(len(x))})
    plots.scatter_samples(SAMPLES_PLOT, x, np.load(TEST)[: len(x)], f"{cfg.method.name}: annealed Langevin, nfe={nfe}")
    run.log_params({"sample": s.model_dump(mode="json")})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)


if __name__ == "__main__":
    main("sample", sample_stage)
