"""Interpolation between samples: the ordinary sampler, drawing its noise from pipeline.rng.InterpolatedNoise.

Row j of an interpolation runs in `frames` frames from sample 2 pairs[j] to sample 2 pairs[j] + 1 of an ordinary
run with the same seed (pipeline.samplers.draw with SampleGenerators(seed, range(n))): frame 0 and frame K-1 draw
exactly those samples' noise, and the frames between draw mixes of it. No sampler is copied: `interpolate` is
`draw` with that generator.

- "slerp" for deterministic samplers (DDIM with eta = 0, the probability-flow ODE): only the prior draw is noise,
  so the frames are the samples of the spherical interpolation of the two prior draws (Shoemake 1985; DDIM,
  Song, Meng & Ermon 2021, arXiv:2010.02502, sec. 5.3).
- "ncsnv2" for stochastic ones: every draw, the prior's included, is z_p cos phi + z_q sin phi with
  phi = linspace(0, pi/2, K) (Song & Ermon 2020, arXiv:2006.09011, appendix B.2), so each frame is an exact sample
  of the sampler and neighbouring frames share most of their noise.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pipeline.processes import Process
from pipeline.rng import INTERPOLATIONS, InterpolatedNoise
from pipeline.samplers import GRID_SAMPLERS, draw
from pipeline.samplers.walk import SampleResult

SCHEMES = INTERPOLATIONS  # ("ncsnv2", "slerp")


def auto_scheme(sampler: str, options: Mapping[str, Any]) -> str:
    """The scheme that suits `sampler`: "slerp" where only the prior draw is noise (ddim with eta == 0, ode with
    any method, dpm_solver, edm_heun without churn), "ncsnv2" where every step draws (ancestral, pc,
    annealed_langevin, ddim with eta > 0, edm_heun with churn)."""
    if sampler not in GRID_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(GRID_SAMPLERS)}")
    deterministic = (sampler in ("ode", "dpm_solver") or (sampler == "ddim" and options["eta"] == 0)
                     or (sampler == "edm_heun" and options["churn"] == 0))
    return "slerp" if deterministic else "ncsnv2"


def interpolate(sampler: str, model_kind: str, fn, process: Process, shape_D: Sequence[int], seed: int,
                pairs: Sequence[int], frames: int, scheme: str, steps: Optional[int], options: Mapping[str, Any], *,
                progress: bool = False, record: Optional[int] = None, device=None) -> SampleResult:
    """len(pairs) rows of `frames` samples, x (len(pairs) * frames, *shape_D), row j frame k at j * frames + k.

    pipeline.samplers.draw(sampler, ...) with generator InterpolatedNoise(seed, pairs, frames, scheme): frame 0 and
    frame K-1 of row j are samples 2 pairs[j] and 2 pairs[j] + 1 of draw(..., SampleGenerators(seed, range(n)))
    with the same settings, up to the float rounding of fn on another number of rows (exactly for the exact
    scores of the tests). Exceptions, which couple the rows of a batch: the PC Langevin corrector and RK45.
    With a stochastic sampler "ncsnv2" interpolates every draw, the initial state's too: NCSNv2's code
    (anneal_Langevin_dynamics_interpolation) shares one initial state across a row instead, but here the ends are
    the ordinary samples. Samples have the default dtype, as draw's (it takes no dtype); options as for draw.
    """
    noise = InterpolatedNoise(seed, pairs, frames, scheme)
    return draw(sampler, model_kind, fn, process, (len(noise), *shape_D), noise, steps, options, progress=progress,
                record=record, device=device)
