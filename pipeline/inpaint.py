"""Inpainting: generate the unknown part of x given its known part, by wrapping a sampler's step.

A mask is 1 where x is known and 0 where it is generated, shaped (*D) or (B, *D) against x (B, *D). Each
method wraps the inner step `step(x, t_cur, t_next, fn, process, generator)` that `pipeline.samplers.plan`
binds, and the one walker `pipeline.samplers.walk.walk` runs it (docs/design.md, "The core abstraction"):

- `replace`: Song et al. 2021 (arXiv:2011.13456, appendix I): after each step the known part is replaced
  by the known values perturbed to the step's end time, x_known m(t) + std(t) z.
- `langevin`: Song & Ermon 2019 (arXiv:1907.05600), appendix B, Algorithm 2: annealed Langevin dynamics with
  the known part held at y + sigma_i z during level i.
- `repaint`: Lugmayr et al. 2022 (arXiv:2201.09865), Algorithm 1 with its jumps (resampling): `replace` walked
  over a grid that goes back up in time (re-noising by the forward transition) `resamples` times per block
  of `jump` steps, so the generated part is harmonised with the known part.
- `mcg`: Chung et al. 2022 (arXiv:2206.00941), sec. 3 and Fig. 1 (steps 1-5): `replace` after a gradient step on
  ||mask (x_known - x0_hat(x_t))||^2 through Tweedie's x0_hat.

The walk's last time is taken as data (the samplers denoise there), so every method returns the known part
as x_known exactly. All noise is drawn through pipeline.rng, so per-sample SampleGenerators make a sample
independent of its batch (except with the batch-coupled PC Langevin corrector); every tensor is made on x's
device and dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from pipeline import rng
from pipeline.gmm import GaussianMixture
from pipeline.names import INPAINT_METHODS, MASKS
from pipeline.parameterization import x0_from_score
from pipeline.processes import Process, append_dims
from pipeline.samplers import FIXED_STEP_ODE, GRID_SAMPLERS, plan
from pipeline.samplers.ddpm import is_clean
from pipeline.samplers.walk import SampleResult, walk

Step = Callable[..., Tensor]

METHODS = INPAINT_METHODS
# RePaint's setting (Lugmayr et al. 2022, experiments: T = 250, jump length j = 10, r = 10 resamplings).
REPAINT_JUMP, REPAINT_RESAMPLES = 10, 10
# MCG's step alpha has no default: the step alpha / ||r|| grad ||r||^2 has a length set by alpha alone, so its effect
# grows with the number of steps and shrinks with the dimension. The MCG code (scale 1 on grad ||r||) is alpha = 0.5
# on 256 x 256 images; on the 2-D mixture oracle (tests/test_inpaint.py) with 500 PC steps 0.01 shows no bias at
# n = 1500 and 0.1 a large one.


# --------------------------------------------------------------------------- masks


def make_mask(kind: str, shape: Sequence[int], generator: rng.Generator = None, keep: float = 0.5, *,
              device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A mask of `shape`, 1 = known and 0 = to generate, for points (D,) / (B, D) or images (C, H, W) / (B, C, H, W).

    box: hides the centre square of half the side (rows and columns [n // 4, n // 4 + n // 2)); half: hides
    the right half (the last W // 2 columns); random: keeps round(keep H W) pixels of each image (all its
    channels) or round(keep D) coordinates of each point, one draw per sample from `generator` (a
    torch.Generator or SampleGenerators with one generator per row of a batched shape); first: keeps
    coordinate 0 of points and generates the rest. ValueError for a mask that does not fit the shape.
    """
    shape = tuple(int(s) for s in shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    images, points = len(shape) in (3, 4), len(shape) in (1, 2)
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; allowed: {', '.join(MASKS)}")
    if kind in ("box", "half"):
        if not images:
            raise ValueError(f"a {kind!r} mask is for images (C, H, W) or (B, C, H, W), got shape {shape}; "
                             "points take 'first' or 'random'")
        h, w = shape[-2:]
        if (kind == "box" and min(h, w) < 2) or w < 2:
            raise ValueError(f"a {kind!r} mask needs images of at least 2 pixels a side, got shape {shape}")
        mask = torch.ones(shape, dtype=dtype)
        if kind == "box":
            mask[..., h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 0
        else:
            mask[..., w - w // 2:] = 0
        return mask.to(device)
    if kind == "first":
        if not points or shape[-1] < 2:
            raise ValueError(f"a 'first' mask is for points (D,) or (B, D) with D >= 2, got shape {shape}; "
                             "images take 'box', 'half' or 'random'")
        mask = torch.zeros(shape, dtype=dtype)
        mask[..., 0] = 1
        return mask.to(device)
    if not (images or points):
        raise ValueError(f"a 'random' mask is for points (D,), (B, D) or images (C, H, W), (B, C, H, W), got {shape}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"the kept fraction of a 'random' mask must be in [0, 1], got {keep}")
    if generator is None:
        raise ValueError("a 'random' mask draws its pixels: pass a generator")
    batched = len(shape) in (2, 4)
    cells = shape[-2:] if images else shape[-1:]
    n = math.prod(cells)
    # ranks of i.i.d. normals are a uniform random permutation: the round(keep n) lowest are kept
    scores = rng.randn((shape[0] if batched else 1, n), generator, dtype=torch.float64)
    mask = (scores.argsort(1).argsort(1) < round(keep * n)).to(dtype).reshape(-1, *((1,) if images else ()), *cells)
    mask = mask.expand(mask.shape[0], *shape[1 if batched else 0:]) if batched else mask[0].expand(shape)
    return mask.contiguous().to(device)


# --------------------------------------------------------------------------- step wrappers


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _known_mask(mask: Tensor, x_known: Tensor) -> Tensor:
    """The mask as booleans on x_known's device, checked to broadcast as (*D) or (B, *D)."""
    if tuple(mask.shape) not in (tuple(x_known.shape), tuple(x_known.shape[1:])):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit x of shape {tuple(x_known.shape)}: "
                         f"it must be {tuple(x_known.shape[1:])} or {tuple(x_known.shape)}")
    return mask.to(x_known.device) != 0


def perturbed_known(x: Tensor, x_known: Tensor, known: Tensor, t: float, process: Process,
                    generator: rng.Generator, t_end: Optional[float] = None) -> Tensor:
    """x with its known part set to a draw of x_t | x_known, m(t) x_known + std(t) z (the process's marginal),
    or to x_known exactly, with no draw, at t_end or a clean time (std(t) = 0). Shapes (B, *D)."""
    y = x_known.to(x.dtype)
    if t != t_end and not is_clean(process, t):
        m, std = process.marginal(_times(x, t))
        y = append_dims(m, x.ndim).to(x.dtype) * y + append_dims(std, x.ndim).to(x.dtype) * rng.randn_like(x, generator)
    return torch.where(known, y, x)


def replace(step: Step, x_known: Tensor, mask: Tensor, t_end: Optional[float] = None) -> Step:
    """Song et al. 2021's PC inpainter (arXiv:2011.13456, appendix I, imputation): after the inner
    step, x_{t_next} = mask (m x_known + std z) + (1 - mask) x_{t_next}, at t_next's marginal (B, *D).

    At t_end (the walk's last time; None: only where std = 0) the known part is x_known exactly. It is only
    approximate: the generated part never sees the known part's noise it was paired with (the motivation of
    RePaint's resampling, Lugmayr et al. 2022); on the mixture oracle of tests/test_inpaint.py it is biased after a
    plain reverse-diffusion step and not measurably so with the PC sampler's Langevin corrector.
    """
    known = _known_mask(mask, x_known)

    def replace_step(x, t_cur, t_next, fn, process, generator):
        x = step(x, t_cur, t_next, fn, process, generator)
        return perturbed_known(x, x_known, known, t_next, process, generator, t_end)

    return replace_step


def langevin(step: Step, x_known: Tensor, mask: Tensor, t_end: Optional[float] = None) -> Step:
    """Song & Ermon 2019 (arXiv:1907.05600), appendix B, Algorithm 2, around annealed_langevin_step (B, *D).

    At the start of level sigma_i (= t_next) it draws y~ = m x_known + std z once; every score evaluation of the
    level's T inner Langevin steps sees the known part replaced by y~, and the step's result has it replaced too.
    Replacing before each evaluation is the same as Algorithm 2's replacement after each inner Langevin update:
    the update of a generated coordinate reads the state only through the score, and the known part's update is
    overwritten. So the replacement is inside the inner loop, without a copy of the sampler. Needs an inner step
    that evaluates the score at t_next only (annealed Langevin); at t_end the known part is x_known exactly.
    """
    known = _known_mask(mask, x_known)

    def langevin_inpaint_step(x, t_cur, t_next, fn, process, generator):
        held = perturbed_known(x, x_known, known, t_next, process, generator)  # y~: the known part of level t_next

        def fn_held(x_in, t):
            return fn(torch.where(known, held, x_in), t)

        x = step(held, t_cur, t_next, fn_held, process, generator)
        return torch.where(known, x_known.to(x.dtype) if t_next == t_end else held, x)

    return langevin_inpaint_step


def repaint_grid(grid: Tensor | Sequence[float], jump: int = REPAINT_JUMP,
                 resamples: int = REPAINT_RESAMPLES) -> Tensor:
    """RePaint's time schedule (Lugmayr et al. 2022, arXiv:2201.09865, resampling with "jumps"), float64.

    Walks the non-increasing grid t_0 > ... > t_N down; on arriving (going down) at position k = N - p with
    p = 1, 1 + jump, 1 + 2 jump, ... and p + jump <= N, it goes back up `jump` positions, one grid time at a
    time, and down again, resamples - 1 times; the last step into t_N is taken once. resamples = 1 is the grid.
    """
    times = grid.tolist() if isinstance(grid, Tensor) else [float(t) for t in grid]
    if isinstance(jump, bool) or not isinstance(jump, int) or jump < 1:
        raise ValueError(f"RePaint's jump length must be an integer >= 1, got {jump!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"RePaint's number of resamplings must be an integer >= 1, got {resamples!r}")
    n = len(times) - 1
    left = {n - p: resamples - 1 for p in range(1, n - jump + 1, jump)}
    path, k = [0], 0
    while k < n:
        k += 1
        path.append(k)
        if left.get(k, 0) > 0:
            left[k] -= 1
            path.extend(range(k - 1, k - jump - 1, -1))
            k -= jump
    return torch.tensor([times[i] for i in path], dtype=torch.float64)


def repaint(step: Step, x_known: Tensor, mask: Tensor, t_end: Optional[float] = None) -> Step:
    """Lugmayr et al. 2022 (arXiv:2201.09865), Algorithm 1, for a walk over `repaint_grid` (B, *D).

    Going up (t_next > t_cur) it re-noises the whole state by the forward transition,
    x_{t_next} = alpha x + sigma_ts z with (alpha, sigma_ts) = process.transition(t_next, t_cur) (their q(x_t | x_{t-1}));
    going down it is `replace` (the inner step, then the known part drawn from q(x_{t_next} | x_known)).
    """
    down = replace(step, x_known, mask, t_end)

    def repaint_step(x, t_cur, t_next, fn, process, generator):
        if t_next > t_cur:
            alpha, sigma = process.transition(_times(x, t_next), _times(x, t_cur))
            b = lambda v: append_dims(v, x.ndim).to(x.dtype)  # noqa: E731
            return b(alpha) * x + b(sigma) * rng.randn_like(x, generator)
        return down(x, t_cur, t_next, fn, process, generator)

    return repaint_step


def mcg(step: Step, x_known: Tensor, mask: Tensor, t_end: Optional[float] = None, *, alpha: float) -> Step:
    """Chung et al. 2022's manifold-constrained gradient (arXiv:2206.00941, sec. 3, Fig. 1 steps 1-5), (B, *D).

    x' = step(x_t); x'' = x' - alpha / ||r|| grad_{x_t} ||r||^2 with r = mask (x_known - x0_hat(x_t)) per sample
    and x0_hat Tweedie's estimate from the score at t_cur (autograd through fn: one more evaluation per step);
    then the `replace` projection onto the known part at t_next. alpha / ||r|| is the paper's normalised step
    (alpha = alpha' / ||y - H x0_hat||); the MCG code's step, grad ||r|| with scale 1, is alpha = 0.5. The step is
    not a posterior correction: large alpha biases the generated part (tests/test_inpaint.py measures it).
    """
    if not alpha >= 0:
        raise ValueError(f"MCG's step size alpha must be >= 0, got {alpha}")
    known = _known_mask(mask, x_known)

    def mcg_step(x, t_cur, t_next, fn, process, generator):
        t = _times(x, t_cur)
        with torch.enable_grad():  # samplers run under no_grad; the gradient is w.r.t. x_t only
            x_in = x.detach().requires_grad_(True)
            x0_hat = x0_from_score(x_in, fn(x_in, t), t, process)
            r = torch.where(known, x_known.to(x.dtype) - x0_hat, torch.zeros_like(x0_hat))
            sq = r.pow(2).flatten(1).sum(1)
            (grad,) = torch.autograd.grad(sq.sum(), x_in)  # samples are independent: row b is grad of sq[b]
        scale = alpha / sq.detach().sqrt().clamp_min(torch.finfo(x.dtype).tiny)  # r = 0 has grad 0: no step
        x = step(x, t_cur, t_next, fn, process, generator) - append_dims(scale, x.ndim) * grad
        return perturbed_known(x, x_known, known, t_next, process, generator, t_end)

    return mcg_step


WRAPPERS: dict[str, Callable[..., Step]] = {"replace": replace, "langevin": langevin, "repaint": repaint, "mcg": mcg}
# The method options each method takes (besides the inner step, x_known, mask and t_end).
METHOD_OPTIONS = {"replace": (), "langevin": (), "repaint": ("jump", "resamples"), "mcg": ("alpha",)}


# --------------------------------------------------------------------------- the inpainting sampler


def check_combination(method: str, sampler: str, model_kind: str, options: Mapping[str, Any]) -> None:
    """ValueError, naming what works, for an inpainting method that does not apply to the sampler or model."""
    if method not in WRAPPERS:
        raise ValueError(f"unknown inpainting method {method!r}; allowed: {', '.join(METHODS)}")
    if sampler == "ode" and options.get("ode_method") not in FIXED_STEP_ODE:
        raise ValueError(f"inpainting wraps a step over a grid, and the {options.get('ode_method')!r} ODE solver "
                         f"picks its own times: use ode_method {' or '.join(FIXED_STEP_ODE)}, or the samplers "
                         f"{', '.join(s for s in GRID_SAMPLERS if s != 'ode')}")
    if method == "langevin" and (sampler != "annealed_langevin" or model_kind == "kernel"):
        raise ValueError(f"inpainting method 'langevin' is Song & Ermon's Algorithm 2 and wraps the annealed_langevin "
                         f"sampler of a score model only, not {sampler!r} ({model_kind}); with other samplers use "
                         "replace, repaint or mcg")
    if method == "mcg" and model_kind == "kernel":
        raise ValueError("inpainting method 'mcg' differentiates Tweedie's x0_hat of a score model; a learned reverse "
                         "kernel has none: use replace or repaint")


def inpaint(sampler: str, model_kind: str, fn, process: Process, x_known: Tensor, mask: Tensor,
            generator: rng.Generator, steps: Optional[int], options: Mapping[str, Any], method: str, *,
            progress: bool = False, record: Optional[int] = None, **method_options) -> SampleResult:
    """Generate x (B, *D) where mask == 0 given x_known (B, *D) where mask == 1 (mask (*D) or (B, *D)).

    The inner (step, grid) is pipeline.samplers.plan's for `sampler` with `options` (as for draw), wrapped by
    `method` (replace, langevin, repaint, mcg; see the module docstring) and walked by the one walker from a
    prior draw whose known part is x_known perturbed to grid[0]. method_options: jump, resamples (repaint),
    alpha (mcg). x lives on x_known's device with its dtype; nfe counts every call of fn (MCG's gradient
    evaluation included). The known part of the result is x_known exactly.
    """
    check_combination(method, sampler, model_kind, options)
    if method == "mcg" and "alpha" not in method_options:
        raise ValueError("inpainting method 'mcg' needs its step size: pass alpha (0.5 is the MCG code's step for "
                         "256x256 images; low-dimensional data need far less, e.g. 0.01 for 2-D points)")
    unknown = set(method_options) - set(METHOD_OPTIONS[method])
    if unknown:
        takes = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise ValueError(f"inpainting method {method!r} takes no option {', '.join(sorted(unknown))}; "
                         f"it takes: {takes}")
    known = _known_mask(mask, x_known)
    if known.device.type != "meta" and ((mask != 0) & (mask != 1)).any():
        raise ValueError("an inpainting mask holds 1 (known) and 0 (to generate) only")
    step, grid, desc = plan(sampler, model_kind, process, steps, options)
    t_end = float(grid[-1])
    if method == "repaint":
        grid = repaint_grid(grid, method_options.get("jump", REPAINT_JUMP),
                            method_options.get("resamples", REPAINT_RESAMPLES))
        wrapped = repaint(step, x_known, mask, t_end)
    else:
        extra = {k: method_options[k] for k in METHOD_OPTIONS[method] if k in method_options}
        wrapped = WRAPPERS[method](step, x_known, mask, t_end, **extra)
    x = process.prior_sample(x_known.shape, generator, x_known.device, x_known.dtype)
    x = perturbed_known(x, x_known, known, float(grid[0]), process, generator, t_end)
    return walk(wrapped, x, grid, fn, process, generator, record=record, progress=progress,
                desc=f"{desc}, {method} inpainting")


# --------------------------------------------------------------------------- the Gaussian-mixture oracle


def gmm_conditional(mixture: GaussianMixture, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact p(x_U | x_K) of a Gaussian mixture, K the coordinates where mask (D,) is 1, U the others.

    A mixture again: weights (B, K) proportional to pi_k N(x_K; mu_kK, S_kKK), means (B, K, |U|)
    mu_kU + S_kUK S_kKK^-1 (x_K - mu_kK), covariances (K, |U|, |U|) S_kUU - S_kUK S_kKK^-1 S_kKU (the Gaussian
    conditioning formulas, e.g. Bishop 2006, eq. (2.81)-(2.82)). x (B, *D) with prod(D) = mixture.dim, float64.
    """
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    m = mask.reshape(-1).to(torch.float64).cpu() != 0
    if m.numel() != mixture.dim or xf.shape[1] != mixture.dim:
        raise ValueError(f"a mixture of dimension {mixture.dim} needs x of {mixture.dim} features and a mask of "
                         f"{mixture.dim} entries, got {xf.shape[1]} and {m.numel()}")
    if m.all() or not m.any():
        raise ValueError("the conditional needs at least one known and one generated coordinate")
    ki, ui = m.nonzero()[:, 0], (~m).nonzero()[:, 0]
    mu, cov = mixture.means.to(xf.device), mixture.covs.to(xf.device)
    s_kk, s_uk, s_uu = cov[:, ki][:, :, ki], cov[:, ui][:, :, ki], cov[:, ui][:, :, ui]
    diff = xf[:, None, ki] - mu[None, :, ki]  # (B, K, |K|)
    chol = torch.linalg.cholesky(s_kk)  # (K, |K|, |K|)
    solved = torch.cholesky_solve(diff[..., None], chol.expand(xf.shape[0], -1, -1, -1))[..., 0]  # S_KK^-1 diff
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_w = torch.log(mixture.weights.to(xf.device)) - 0.5 * ((diff * solved).sum(-1) + logdet
                                                             + len(ki) * math.log(2 * math.pi))
    means = mu[None, :, ui] + torch.einsum("kuj,bkj->bku", s_uk, solved)
    covs = s_uu - s_uk @ torch.cholesky_solve(s_uk.transpose(1, 2), chol)
    return torch.softmax(log_w, dim=1), means, covs


def gmm_conditional_cdf(mixture: GaussianMixture, x: Tensor, mask: Tensor) -> Tensor:
    """F(x_u | x_K), the exact conditional CDF of the one generated coordinate u (mask (D,) zero there) at x (B, *D).

    With x_u drawn from p(x_u | x_K) this is uniform on [0, 1] (the probability-integral transform), so a
    Kolmogorov-Smirnov test of it measures an inpainter. (B,), float64.
    """
    if int((mask.reshape(-1) == 0).sum()) != 1:
        raise ValueError("the conditional CDF is of one generated coordinate: the mask needs exactly one 0")
    weights, means, covs = gmm_conditional(mixture, x, mask)
    u = x.reshape(x.shape[0], -1).to(torch.float64)[:, (mask.reshape(-1).cpu() == 0).nonzero()[0, 0]]
    z = (u[:, None] - means[..., 0]) / covs[None, :, 0, 0].sqrt()
    return (weights * torch.special.ndtr(z)).sum(1)
