"""Samplers: steps of the form step(x, t_cur, t_next, fn, process, generator) over a float64 grid,
walked by the one walker pipeline.samplers.walk.walk (SciPy's adaptive RK45 excepted: it picks its own times).

`plan` resolves a sampler name and its options to the bound step and the grid it walks; `draw` walks that
plan from a prior draw, and guidance or inpainting (pipeline.inpaint) wrap the same step, so there is one
definition of every sampler. Every sampler returns a SampleResult (samples, nfe, the network evaluations per
sample, and a recorded trajectory). The generator is a torch.Generator or per-sample SampleGenerators
(pipeline.rng); with the latter, samples do not depend on the batch size, except with the PC Langevin corrector
and RK45, which couple the batch (see their docstrings).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.names import SAMPLERS, VELOCITY_SAMPLERS
from pipeline.processes import Process
from pipeline.samplers.consistency import consistency_plan
from pipeline.samplers.fast import DPMSolverPP2M, dpm_solver_sampler, edm_plan, edm_sampler, fast_grid, sigma_of
from pipeline.samplers.ddpm import (VARIANCES, ancestral_step, ddim_sampler, ddim_step, ddpm_sampler, kernel_sampler,
                                    kernel_step)
from pipeline.samplers.langevin import annealed_langevin, annealed_langevin_plan, annealed_langevin_step
from pipeline.samplers.ode import ODE_METHODS, ode_sampler, ode_step
from pipeline.samplers.pc import pc_plan, pc_sampler, pc_step
from pipeline.samplers.walk import SampleResult, WalkResult, prior_walk, walk

Step = Callable[..., Tensor]  # step(x, t_cur, t_next, fn, process, generator) -> x_next (pipeline.samplers.walk)

__all__ = ["SampleResult", "WalkResult", "walk", "draw", "plan", "GRID_SAMPLERS", "ancestral_step", "ddim_step",
           "kernel_step", "pc_step", "annealed_langevin_step", "ode_step", "ddpm_sampler", "ddim_sampler",
           "kernel_sampler", "pc_sampler", "annealed_langevin", "ode_sampler", "edm_sampler", "dpm_solver_sampler"]

# What the walker's fn is (pipeline.models.network_fn): a score, Sohl-Dickstein's learned kernel, or a flow-matching
# velocity, which the ODE, DPM-Solver++ and the consistency sampler walk (their data prediction needs no score).
MODEL_KINDS = ("score", "kernel", "velocity")
VELOCITY_WALKS = (*VELOCITY_SAMPLERS, "consistency")
# The samplers that are a step walked over a grid ("ode" only with its fixed-step methods, FIXED_STEP_ODE).
GRID_SAMPLERS = SAMPLERS
# The few-step samplers' steps when none is given: EDM's 18 Heun steps (35 NFE on CIFAR-10, Karras et al. 2022,
# Table 2), DPM-Solver++(2M)'s 20 (Lu et al. 2022b's budget for unguided sampling) and a consistency model's one.
FAST_DEFAULT_STEPS = {"edm_heun": 18, "dpm_solver": 20, "consistency": 1}
# Their time spacing when sample.spacing is 'auto': each paper's own (EDM's ρ-schedule, DPM-Solver's log-SNR; the
# consistency model's: EDM's, as Song et al. 2023 discretise).
FAST_DEFAULT_SPACING = {"edm_heun": "karras", "dpm_solver": "logsnr", "consistency": "karras"}
FIXED_STEP_ODE = tuple(m for m in ODE_METHODS if m != "rk45")
# The fixed-step ODE's number of steps when none is given (what ode_sampler's `steps` defaults to).
ODE_DEFAULT_STEPS = 100


def _spacing(sampler: str, options: Mapping[str, Any], process: Process) -> str:
    """sample.spacing resolved: auto is the sampler's own (spacing_of)."""
    spacing = options.get("spacing", "auto")
    return spacing_of(FAST_DEFAULT_SPACING[sampler], process) if spacing == "auto" else spacing


def spacing_of(spacing: str, process: Process) -> str:
    """`spacing`, or uniform time where σ = std / m is infinite at t_max (flow matching's pure-noise end, which
    neither the ρ- nor the log-SNR schedule can space)."""
    t_max = torch.tensor([process.t_max], dtype=torch.float64)
    return "time" if process.continuous and float(sigma_of(process, t_max)) == math.inf else spacing


def plan(sampler: str, model_kind: str, process: Process, steps: Optional[int],
         options: Mapping[str, Any]) -> tuple[Step, Tensor, str]:
    """(step, grid, desc): the bound step, the float64 grid it walks and a progress label, for every grid sampler.

    Exactly what the samplers walk (edm_heun over edm_grid and dpm_solver over logsnr_grid, pipeline.samplers.fast;
    annealed_langevin, ddpm_sampler, ddim_sampler, pc_sampler, ode_sampler with
    euler / heun, kernel_sampler when model_kind == "kernel"), so `walk(step, x, grid, fn, ...)` from the same
    prior draw gives the same bits. options: as for `draw`; only the chosen sampler's keys are read. The RK45 ODE
    is refused: it chooses its own times and is no walk over a grid.
    """
    o = options
    if model_kind == "kernel":
        if sampler != "ancestral":
            raise ValueError(f"a learned reverse kernel is sampled ancestrally, not with {sampler!r}")
        return kernel_step, process.grid(), "learned kernel"
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {model_kind!r}; allowed: {', '.join(MODEL_KINDS)}")
    if model_kind == "velocity" and sampler not in VELOCITY_WALKS:
        raise ValueError(f"a flow-matching velocity is sampled by the ODE (sample.sampler: "
                         f"{' or '.join(VELOCITY_WALKS)}), not {sampler!r}, which steps with a score")
    field = model_kind  # what fn is, as the ODE and the data prediction read it (pipeline.samplers.ode.FIELDS)
    if sampler == "annealed_langevin":
        step, grid = annealed_langevin_plan(process, o["step_size"], o["steps_per_scale"], o["denoise"])
        return step, grid, "annealed Langevin"
    if sampler == "ancestral":
        if o["variance"] not in VARIANCES:
            raise ValueError(f"unknown ancestral variance {o['variance']!r}; allowed: {', '.join(VARIANCES)}")
        return partial(ancestral_step, variance=o["variance"]), process.grid(steps), "ancestral"
    if sampler == "ddim":
        if not 0.0 <= o["eta"] <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {o['eta']}")
        return partial(ddim_step, eta=o["eta"]), process.grid(steps), "DDIM"
    if sampler == "pc":
        step, grid = pc_plan(process, steps, o["predictor"], o["corrector"], o["snr"], o["corrector_steps"],
                             o["lam"], o["denoise"])
        return step, grid, "PC sampling"
    if sampler == "ode":
        method = o["ode_method"]
        if method not in FIXED_STEP_ODE:
            if method in ODE_METHODS:
                raise ValueError(f"the {method} ODE solver picks its own times and is no walk over a grid; "
                                 f"grid ODE methods: {', '.join(FIXED_STEP_ODE)}")
            raise ValueError(f"unknown ODE method {method!r}; allowed: {', '.join(ODE_METHODS)}")
        return (partial(ode_step, method=method, field=field), process.grid(steps or ODE_DEFAULT_STEPS),
                f"ODE ({method})")
    if sampler == "edm_heun":
        step, grid = edm_plan(process, steps or FAST_DEFAULT_STEPS[sampler], o["rho"], o["churn"], o["s_tmin"],
                              o["s_tmax"], o["s_noise"], _spacing(sampler, o, process))
        return step, grid, "EDM Heun" if o["churn"] == 0 else "EDM Heun (churn)"
    if sampler == "dpm_solver":
        grid = fast_grid(process, steps or FAST_DEFAULT_STEPS[sampler], _spacing(sampler, o, process))
        return DPMSolverPP2M(field), grid, "DPM-Solver++(2M)"
    if sampler == "consistency":
        step, grid = consistency_plan(process, steps or FAST_DEFAULT_STEPS[sampler], _spacing(sampler, o, process),
                                      field)
        return step, grid, "consistency"
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(GRID_SAMPLERS)}")


def draw(sampler: str, model_kind: str, fn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
         steps: Optional[int], options: Mapping[str, Any], progress: bool = False, record: Optional[int] = None,
         device=None) -> SampleResult:
    """Draw shape[0] samples with `sampler`; fn is a score_fn, a kernel_fn when model_kind == "kernel", or a
    velocity_fn when model_kind == "velocity" (ode, dpm_solver, consistency).

    options: denoise, variance (ancestral), eta (ddim), predictor, corrector, snr, corrector_steps,
    lam (pc), ode_method, rtol, atol (ode), step_size, steps_per_scale (annealed_langevin), rho, churn, s_tmin,
    s_tmax (None: no bound), s_noise (edm_heun), spacing (edm_heun, dpm_solver: karras, logsnr, time or auto).
    record=k also returns k (t, x) states evenly spread over the walk, the prior draw and the result
    included (RK45: the start and the end only). device: where x lives (the generator's device if None).
    Every sampler but RK45 is `plan`'s step walked from a prior draw.
    """
    if model_kind != "kernel" and sampler == "ode" and options["ode_method"] == "rk45":
        return ode_sampler(fn, process, shape, generator, method="rk45", steps=steps or ODE_DEFAULT_STEPS,
                           rtol=options["rtol"], atol=options["atol"], device=device, record=record,
                           field=model_kind)
    step, grid, desc = plan(sampler, model_kind, process, steps, options)
    return prior_walk(step, fn, process, shape, generator, grid, device=device, record=record, progress=progress,
                      desc=desc)
