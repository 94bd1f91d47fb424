"""Samplers: steps of the form step(x, t_cur, t_next, fn, process, generator) over a float64 grid,
walked by the one walker pipeline.samplers.walk.walk (SciPy's adaptive RK45 excepted: it picks its own times).

`draw` runs the sampler a method resolved to (pipeline.methods) with its options; every sampler
returns a SampleResult (samples, nfe, the network evaluations per sample, and a recorded trajectory).
The generator is a torch.Generator or per-sample SampleGenerators (pipeline.rng); with the latter,
samples do not depend on the batch size, except with the PC Langevin corrector and RK45, which couple
the batch (see their docstrings).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from pipeline import rng
from pipeline.processes import Process
from pipeline.samplers.ddpm import ancestral_step, ddim_sampler, ddim_step, ddpm_sampler, kernel_sampler, kernel_step
from pipeline.samplers.langevin import annealed_langevin, annealed_langevin_step
from pipeline.samplers.ode import ode_sampler, ode_step
from pipeline.samplers.pc import pc_sampler, pc_step
from pipeline.samplers.walk import SampleResult, WalkResult, walk

__all__ = ["SampleResult", "WalkResult", "walk", "draw", "ancestral_step", "ddim_step", "kernel_step", "pc_step",
           "annealed_langevin_step", "ode_step", "ddpm_sampler", "ddim_sampler", "kernel_sampler", "pc_sampler",
           "annealed_langevin", "ode_sampler"]


def draw(sampler: str, model_kind: str, fn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
         steps: Optional[int], options: Mapping[str, Any], progress: bool = False, record: Optional[int] = None,
         device=None) -> SampleResult:
    """Draw shape[0] samples with `sampler`; fn is a score_fn, or a kernel_fn when model_kind == "kernel".

    options: denoise, variance (ancestral), eta (ddim), predictor, corrector, snr, corrector_steps,
    lam (pc), ode_method, rtol, atol (ode), step_size, steps_per_scale (annealed_langevin).
    record=k also returns k (t, x) states evenly spread over the walk, the prior draw and the result
    included (RK45: the start and the end only). device: where x lives (the generator's device if None).
    """
    o = options
    common = dict(device=device, record=record)
    if model_kind == "kernel":
        if sampler != "ancestral":
            raise ValueError(f"a learned reverse kernel is sampled ancestrally, not with {sampler!r}")
        return kernel_sampler(fn, process, shape, generator, progress=progress, **common)
    if sampler == "annealed_langevin":
        return annealed_langevin(fn, process, shape, o["step_size"], o["steps_per_scale"], generator,
                                 denoise=o["denoise"], progress=progress, **common)
    if sampler == "ancestral":
        return ddpm_sampler(fn, process, shape, generator, steps, variance=o["variance"], progress=progress, **common)
    if sampler == "ddim":
        return ddim_sampler(fn, process, shape, generator, steps, eta=o["eta"], progress=progress, **common)
    if sampler == "pc":
        return pc_sampler(fn, process, shape, generator, steps, predictor=o["predictor"], corrector=o["corrector"],
                          snr=o["snr"], corrector_steps=o["corrector_steps"], lam=o["lam"], denoise=o["denoise"],
                          progress=progress, **common)
    if sampler == "ode":
        return ode_sampler(fn, process, shape, generator, method=o["ode_method"], steps=steps or 100,
                           rtol=o["rtol"], atol=o["atol"], **common)
    raise ValueError(f"unknown sampler {sampler!r}; allowed: annealed_langevin, ancestral, ddim, pc, ode")
