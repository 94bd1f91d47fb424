"""noise_scales: choose the forward process: NCSN's scales (NCSNv2 techniques 1, 2, 4), DDPM's betas, or an SDE."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, plots
from pipeline.config import Config
from pipeline.methods import build_process, num_steps_for
from pipeline.noise import choose_noise_scales
from pipeline.samplers.langevin import annealed_step_sizes
from pipeline.tracking import StageRun
from stages.common import NOISE_PLOT, NOISE_SCALES, TRAIN, main, plan_of


def noise_scales(cfg: Config, run: StageRun) -> None:
    n, m = cfg.noise, cfg.method
    scales = choose_noise_scales(np.load(TRAIN), m.name, n.sigma_max, n.sigma_min, n.num_scales,
                                 n.fallback_num_scales, n.steps_per_scale, n.step_size, n.max_exact_pairwise, cfg.seed)
    kind = plan_of(cfg).process
    process = build_process(kind, sigmas=scales.sigmas, num_steps=num_steps_for(m.name, m.num_steps), schedule=m.schedule)
    record = scales.to_json()
    record["process"] = process.spec()
    io.write_json(NOISE_SCALES, record)
    if kind == "noise_scales":
        alphas = annealed_step_sizes(torch.tensor(scales.sigmas, dtype=torch.float64), scales.step_size).tolist()
        plots.noise_schedule(NOISE_PLOT, scales.sigmas, alphas,
                             f"L={len(scales.sigmas)}, eps={scales.step_size:.3g}, T={scales.steps_per_scale}")
    else:
        t = process.grid(None if not process.continuous else 200).flip(0)
        mean_coef, std = process.marginal(t)
        plots.process_schedule(NOISE_PLOT, t.tolist(), mean_coef.tolist(), std.tolist(),
                               f"{m.name} ({kind}): x_t = mean_coef x0 + std z", "step i" if not process.continuous else "t")
    run.log_params({"method.name": m.name, "method.sde": m.sde, "method.schedule": m.schedule,
                    "method.num_steps": m.num_steps, "noise": n.model_dump(mode="json")})
    run.log_metrics({k: record[k] for k in ("sigma_max", "sigma_min", "num_scales", "step_size", "ratio", "steps_per_scale")})
    run.log_artifact(NOISE_PLOT)


if __name__ == "__main__":
    main("noise_scales", noise_scales)
