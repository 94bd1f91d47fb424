"""noise_scales: choose the forward process: NCSN's scales (NCSNv2 techniques 1, 2, 4), the chain's betas, or an SDE.

The NCSN scales are computed only where they are used (NCSN's process, and VE's sigma range), so a
noise.* change leaves the record of a DDPM or VP run byte-identical and DVC re-runs nothing after it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline import defaults, io, plots
from pipeline.config import Config
from pipeline.kinds import kind_of
from pipeline.noise import SCALED_KINDS, choose_noise_scales
from pipeline.samplers.langevin import annealed_step_sizes
from pipeline.tracking import StageRun
from stages.common import NOISE_PLOT, NOISE_SCALES, TRAIN, data_record, main, resolve

NCSN_KEYS = ("sigma_max", "sigma_min", "num_scales", "step_size", "ratio", "steps_per_scale")


def noise_scales(cfg: Config, run: StageRun) -> None:
    n, m = cfg.noise, cfg.method
    r = resolve(cfg)
    kind = r.plan.process
    # the data's kind; image data with the pixel scaling the model sees, recorded here for train, sample and
    # evaluate (docs/design.md, "Images, devices, several GPUs")
    info = data_record()
    data = kind_of(info).for_process(kind, cfg.data.scaling)
    record: dict = {}
    sigmas: list[float] = []
    if kind in SCALED_KINDS:  # NCSN's scales, and VE's sigma_max (technique 1) and sigma_min
        train = data.to_model(np.load(TRAIN)).numpy()  # technique 1 measures distances where the model works
        start = time.perf_counter()
        scales = choose_noise_scales(train, r.family.noise_defaults, n.sigma_max, n.sigma_min, n.num_scales,
                                     n.fallback_num_scales, n.steps_per_scale, n.step_size, n.max_exact_pairwise,
                                     cfg.seed, auto_steps=defaults.langevin_steps(info))
        print(f"noise_scales: chose {len(scales.sigmas)} scales in {time.perf_counter() - start:.1f} s "
              f"(sigma_1 = {scales.sigma_max:.4g}: {scales.how['sigma_max']})")
        record, sigmas = scales.to_json(), scales.sigmas
    process = r.family.build_process(kind, m, sigmas)
    record["process"] = process.spec()
    record |= data.noise_record()
    io.write_json(NOISE_SCALES, record)
    if kind == "noise_scales":
        alphas = annealed_step_sizes(torch.tensor(sigmas, dtype=torch.float64), scales.step_size).tolist()
        plots.noise_schedule(NOISE_PLOT, sigmas, alphas,
                             f"L={len(sigmas)}, eps={scales.step_size:.3g}, T={scales.steps_per_scale}")
    else:
        t = process.grid(None if not process.continuous else 200).flip(0)
        mean_coef, std = process.marginal(t)
        plots.process_schedule(NOISE_PLOT, t.tolist(), mean_coef.tolist(), std.tolist(),
                               f"{m.name} ({process.spec()['kind']}): x_t = mean_coef x0 + std z",
                               "step i" if not process.continuous else "t")
    run.log_params({"method.name": m.name, "method.sde": m.sde, "method.schedule": m.schedule,
                    "method.num_steps": m.num_steps, "noise": n.model_dump(mode="json"), "scaling": data.scaling})
    run.log_metrics({k: record[k] for k in NCSN_KEYS if k in record})
    run.log_artifact(NOISE_PLOT)


if __name__ == "__main__":
    main("noise_scales", noise_scales)
