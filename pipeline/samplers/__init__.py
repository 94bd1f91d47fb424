"""Samplers: steps of the form step(x, t_cur, t_next, score_fn, process, generator) over a float64 grid.

`draw` runs the sampler a method resolved to (pipeline.methods) with its options; every sampler
returns a SampleResult (samples and nfe, the network evaluations per sample).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from pipeline.processes import Process
from pipeline.samplers.ddpm import ddim_sampler, ddpm_sampler, kernel_sampler
from pipeline.samplers.langevin import SampleResult, annealed_langevin
from pipeline.samplers.ode import ode_sampler
from pipeline.samplers.pc import pc_sampler


def draw(sampler: str, model_kind: str, fn, process: Process, shape: tuple[int, ...], generator: torch.Generator,
         steps: Optional[int], options: Mapping[str, Any], progress: bool = False) -> SampleResult:
    """Draw shape[0] samples with `sampler`; fn is a score_fn, or a kernel_fn when model_kind == "kernel".

    options: denoise, variance (ancestral), eta (ddim), predictor, corrector, snr, corrector_steps,
    lam (pc), ode_method, rtol, atol (ode), step_size, steps_per_scale (annealed_langevin).
    """
    o = options
    if model_kind == "kernel":
        if sampler != "ancestral":
            raise ValueError(f"a learned reverse kernel is sampled ancestrally, not with {sampler!r}")
        return kernel_sampler(fn, process, shape, generator, progress=progress)
    if sampler == "annealed_langevin":
        return annealed_langevin(fn, process, shape, o["step_size"], o["steps_per_scale"], generator,
                                 denoise=o["denoise"], progress=progress)
    if sampler == "ancestral":
        return ddpm_sampler(fn, process, shape, generator, steps, variance=o["variance"], progress=progress)
    if sampler == "ddim":
        return ddim_sampler(fn, process, shape, generator, steps, eta=o["eta"], progress=progress)
    if sampler == "pc":
        return pc_sampler(fn, process, shape, generator, steps, predictor=o["predictor"], corrector=o["corrector"],
                          snr=o["snr"], corrector_steps=o["corrector_steps"], lam=o["lam"], denoise=o["denoise"],
                          progress=progress)
    if sampler == "ode":
        return ode_sampler(fn, process, shape, generator, method=o["ode_method"], steps=steps or 100,
                           rtol=o["rtol"], atol=o["atol"])
    raise ValueError(f"unknown sampler {sampler!r}; allowed: annealed_langevin, ancestral, ddim, pc, ode")
