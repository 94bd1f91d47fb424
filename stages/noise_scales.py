"""noise_scales: choose sigma_1, the number of scales and the Langevin step size (NCSNv2 techniques 1, 2, 4)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, plots
from pipeline.config import Config
from pipeline.noise import choose_noise_scales
from pipeline.samplers.langevin import annealed_step_sizes
from pipeline.tracking import StageRun
from stages.common import NOISE_PLOT, NOISE_SCALES, TRAIN, main


def noise_scales(cfg: Config, run: StageRun) -> None:
    n = cfg.noise
    scales = choose_noise_scales(np.load(TRAIN), cfg.method.name, n.sigma_max, n.sigma_min, n.num_scales,
                                 n.fallback_num_scales, n.steps_per_scale, n.step_size, n.max_exact_pairwise, cfg.seed)
    record = scales.to_json()
    io.write_json(NOISE_SCALES, record)
    alphas = annealed_step_sizes(torch.tensor(scales.sigmas, dtype=torch.float64), scales.step_size).tolist()
    plots.noise_schedule(NOISE_PLOT, scales.sigmas, alphas,
                         f"L={len(scales.sigmas)}, eps={scales.step_size:.3g}, T={scales.steps_per_scale}")
    run.log_params({"method.name": cfg.method.name, "noise": n.model_dump(mode="json")})
    run.log_metrics({k: record[k] for k in ("sigma_max", "sigma_min", "num_scales", "step_size", "ratio", "steps_per_scale")})
    run.log_artifact(NOISE_PLOT)


if __name__ == "__main__":
    main("noise_scales", noise_scales)
