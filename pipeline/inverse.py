"""Linear inverse problems y = A x + sigma_y n solved with an unconditional score model, by wrapping a sampler's step.

An operator A maps x (B, *D) to a measurement (B, *K) (`Operator`: mask, colorize, downsample, blur, matrix). Each
method wraps the inner step `step(x, t_cur, t_next, fn, process, generator)` that `pipeline.samplers.plan` binds,
and the one walker `pipeline.samplers.walk.walk` runs it (docs/design.md, "The core abstraction"):

- `replace`: Song et al. 2021 (arXiv:2011.13456, sec. 5 and appendix I, imputation and colourisation): after each
  step the measured part of x, its component in the row space of A, is replaced by the measurement perturbed to the
  step's end time, x <- x + A^+ (m(t) y + std(t) A z - A x). For a mask this is the known pixels set to
  m x_known + std z; for colourisation it is Song et al.'s orthogonal decoupling (the grey channel of an orthogonal
  colour basis replaced, the two others generated). Noiseless measurements only.
- `langevin`: Song & Ermon 2019 (arXiv:1907.05600), appendix B, Algorithm 2: annealed Langevin dynamics with the
  measured part held at one perturbed draw per noise level.
- `repaint`: Lugmayr et al. 2022 (arXiv:2201.09865), Algorithm 1 with its jumps: `replace` walked over a grid that
  goes back up in time (re-noising by the forward transition).
- `mcg`: Chung et al. 2022 (arXiv:2206.00941), sec. 3 and Fig. 1: a gradient step on ||y - A x0_hat(x_t)||^2
  through Tweedie's x0_hat, then the `replace` projection (onto the noisy y when sigma_y > 0, as the paper's
  method is; Chung et al. 2023, sec. 3.2, show that this projection hurts with noise).
- `dps`: Chung et al. 2023 (arXiv:2209.14687), Algorithm 1: the same gradient step with no projection, which makes
  it the method for noisy measurements.

The walk's last time is taken as data (the samplers denoise there), so the projecting methods return A x = y to
the precision of A^+ (exactly x_known on a mask's known entries). Data clipped to a range afterwards (pixels) would
lose that: given the range, they end on the nearest point of {A x = y} inside it (`Operator.project_box`). All noise is drawn through pipeline.rng, so
per-sample SampleGenerators make a sample independent of its batch; every tensor is made on x's device and dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import rng
from pipeline.names import INVERSE_METHODS
from pipeline.parameterization import x0_from_score
from pipeline.processes import Process, append_dims
from pipeline.samplers import FIXED_STEP_ODE, GRID_SAMPLERS, plan
from pipeline.samplers.ddpm import is_clean
from pipeline.samplers.walk import SampleResult, walk

Step = Callable[..., Tensor]

METHODS = INVERSE_METHODS
# The methods that put the measurement into x (A x = y at the end): they need y without noise, except MCG, whose
# paper projects onto the noisy y as well.
PROJECTING = ("replace", "langevin", "repaint", "mcg")
# RePaint's setting (Lugmayr et al. 2022, experiments: T = 250, jump length j = 10, r = 10 resamplings).
REPAINT_JUMP, REPAINT_RESAMPLES = 10, 10
# ITU-R BT.601 luma: the grey value of an RGB pixel (Song et al. 2021 colourise to such a grey channel).
LUMA_BT601 = (0.299, 0.587, 0.114)
# Blur's pseudo-inverse keeps the frequencies whose gain is above this fraction of the largest (a truncated SVD, as
# Kawar et al. 2022 do for deblurring): the rest are not measured in any useful sense and are generated.
BLUR_CUTOFF = 1e-3
# Operator.project_box (Dykstra) stops once its last two projections agree within this fraction of the box's width
# entrywise (0.026 of a grey level for 8-bit images, where the uint8 rounding that follows is up to half a level),
# or after that many rounds.
BOX_TOLERANCE, BOX_ITERATIONS = 1e-4, 1000
# project_box_rows: the bracket's doublings (each doubles mu's range) and the bisections (each halves it): 60 take a
# bracket of 4 box widths below float32's resolution.
BOX_DOUBLINGS, BOX_BISECTIONS = 60, 60


# --------------------------------------------------------------------------- operators


class Operator:
    """A linear measurement A: x (B, *D) -> A x (B, *K), with a pseudo-inverse A^+ (B, *K) -> (B, *D)."""

    name = "operator"

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pinv(self, y: Tensor) -> Tensor:
        """A^+ y: the minimum-norm x with A x = y (on the row space of A)."""
        raise NotImplementedError

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """x with its row-space component replaced by the one that A maps to y: x + A^+ (y - A x) (B, *D)."""
        return x + self.pinv(y - self(x))

    def project_box(self, x: Tensor, y: Tensor, low: float, high: float) -> Tensor:
        """The nearest point to x (B, *D) of {A x = y} within the box [low, high]^D (the set `project` projects onto:
        A^+ A x = A^+ y where A^+ is truncated), by Dykstra's alternating projections (Boyle & Dykstra 1986;
        Bauschke & Borwein 1994: the iterates converge to the nearest point of the intersection when it is not
        empty, as it is for y measured from an x in the box), ending on the box so that the box holds exactly; it
        stops when the last two projections are within BOX_TOLERANCE of (high - low) entrywise, or after
        BOX_ITERATIONS rounds (convergence can be slow where the sets meet at a shallow angle)."""
        tol = BOX_TOLERANCE * (high - low)
        z, p, q = x, torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(BOX_ITERATIONS):
            a = self.project(z + p, y)
            p = z + p - a
            z = (a + q).clamp(low, high)
            q = a + q - z
            if (z - a).abs().max() <= tol:
                break
        return z

    def display(self, y: Tensor, fill: float = 0.0) -> Tensor:
        """The measurement y (B, *K) shown as x (B, *D) is: A^+ y (a low-resolution image's pixels repeated);
        `fill` where nothing is measured (a mask's hidden entries)."""
        return self.pinv(y)

    def rows(self, rows: slice) -> "Operator":
        """The operator of the items `rows` of a batch (a per-item mask's rows; the others are the same for all)."""
        return self

    def arrays(self) -> dict:
        """Arrays that describe() cannot hold, for samples.npz (a mask's 0/1 entries)."""
        return {}

    def describe(self) -> dict:
        """What the operator is, for samples.npz and the metrics (JSON-able)."""
        return {"operator": self.name}


def project_box_rows(operator: Operator, x: Tensor, y: Tensor, low: float, high: float) -> Tensor:
    """Operator.project_box, exact, for an A whose rows have disjoint supports and non-negative weights, with
    A^+ y = A^T diag(1 / ||a_k||^2) y (colourisation: one row per pixel; block means: one per block): (B, *D).

    The nearest point is x(mu) = clip(x - A^+ mu, low, high) with mu (B, *K) solving A x(mu) = y (the KKT
    conditions of the projection; Boyd & Vandenberghe 2004, sec. 5.5.3), one equation per row in its own mu_k,
    decreasing in mu_k: bisection per row, after doubling a bracket. A y outside A's image of the box (a noisy
    measurement, or a white pixel whose luma rounds above the top) gets the box's nearest corner."""
    def x_at(mu: Tensor) -> Tensor:
        return (x - operator.pinv(mu)).clamp(low, high)

    span = torch.full_like(y, 2.0 * (high - low) + float((x - x.clamp(low, high)).abs().max()))
    for _ in range(BOX_DOUBLINGS):  # the bracket [-span, span]: A x(-span) >= y >= A x(span) on every row
        short = (operator(x_at(span)) > y) | (operator(x_at(-span)) < y)
        if not short.any():
            break
        span = torch.where(short, 2.0 * span, span)
    lo_mu, hi_mu = -span, span
    for _ in range(BOX_BISECTIONS):
        mid = 0.5 * (lo_mu + hi_mu)
        above = operator(x_at(mid)) > y
        lo_mu, hi_mu = torch.where(above, mid, lo_mu), torch.where(above, hi_mu, mid)
    return x_at(0.5 * (lo_mu + hi_mu))


class Mask(Operator):
    """Inpainting: A x = mask x, 1 where x is known and 0 where it is generated; mask (*D) or (B, *D) of 0/1, and the
    measurement keeps x's shape (zeros where hidden). A^+ = A; the projection sets the known entries exactly."""

    name = "mask"

    def __init__(self, mask: Tensor, shape: Sequence[int], kind: Optional[str] = None):
        shape = tuple(int(s) for s in shape)
        if tuple(mask.shape) not in (shape, shape[1:]):
            raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit x of shape {shape}: it must be "
                             f"{shape[1:]} or {shape}")
        if mask.device.type != "meta" and ((mask != 0) & (mask != 1)).any():
            raise ValueError("an inpainting mask holds 1 (known) and 0 (to generate) only")
        self.mask, self.known, self.kind, self.shape = mask, mask != 0, kind, shape

    def __call__(self, x: Tensor) -> Tensor:
        return torch.where(self.known.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))

    pinv = __call__

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.where(self.known.to(x.device), y, x)

    def project_box(self, x: Tensor, y: Tensor, low: float, high: float) -> Tensor:
        # the constraint and the box are separable per entry: the known entries y (inside the box), the others
        # clipped, which is the nearest point of the intersection with no iterations
        return self.project(x.clamp(low, high), y)

    def display(self, y: Tensor, fill: float = 0.0) -> Tensor:
        return torch.where(self.known.to(y.device), y, torch.full((), fill, dtype=y.dtype, device=y.device))

    def arrays(self) -> dict:
        return {"mask": self.mask.to(torch.uint8).cpu().numpy()}

    def rows(self, rows: slice) -> "Mask":
        if tuple(self.mask.shape) == self.shape[1:]:  # one mask for every item
            return self
        part = self.mask[rows]
        return Mask(part, (len(part), *self.shape[1:]), self.kind)

    def describe(self) -> dict:
        return {"operator": self.name, "known_fraction": float(self.mask.float().mean())} | (
            {"mask": self.kind} if self.kind else {})


class Colorize(Operator):
    """Colourisation: A x = sum_c w_c x_c, RGB (B, 3, H, W) -> grey (B, 1, H, W) with the luma weights w (ITU-R
    BT.601 by default). Linear, so the same rule in pixels and in model space (the weights sum to 1, and the
    scalings are affine). A^+ y = w y / ||w||^2."""

    name = "colorize"

    def __init__(self, weights: Sequence[float] = LUMA_BT601):
        self.weights = tuple(float(w) for w in weights)

    def _w(self, x: Tensor) -> Tensor:
        return torch.tensor(self.weights, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.weights):
            raise ValueError(f"colourisation measures RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
        return (self._w(x) * x).sum(1, keepdim=True)

    def pinv(self, y: Tensor) -> Tensor:
        w = self._w(y)
        return w * y / (w ** 2).sum()

    project_box = project_box_rows  # one row per pixel, the luma weights

    def display(self, y: Tensor, fill: float = 0.0) -> Tensor:
        return y.expand(-1, len(self.weights), -1, -1)  # the grey image itself

    def describe(self) -> dict:
        return {"operator": self.name, "weights": list(self.weights), "rule": "ITU-R BT.601 luma"}


class Downsample(Operator):
    """Super-resolution: A x = the mean of each factor x factor block, (B, C, H, W) -> (B, C, H/f, W/f). A A^T = I/f^2,
    so A^+ = f^2 A^T: each low-resolution pixel repeated over its block."""

    name = "downsample"

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"the downsampling factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"downsampling by {self.factor} needs images (B, C, H, W) whose sides it divides, got "
                             f"shape {tuple(x.shape)}")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    project_box = project_box_rows  # one row per block, weights 1 / f^2

    def describe(self) -> dict:
        return {"operator": self.name, "factor": self.factor}


class Blur(Operator):
    """Deblurring: A x = x convolved with a Gaussian kernel of standard deviation `width` pixels, periodic at the
    borders, so that the FFT diagonalises A (gains K(f) > 0, real: a wrapped Gaussian's transform). A^+ divides by
    the gain where it is above BLUR_CUTOFF of the largest and drops the rest (a truncated SVD)."""

    name = "blur"

    def __init__(self, width: float, cutoff: float = BLUR_CUTOFF):
        if not width > 0:
            raise ValueError(f"the blur's width must be > 0 pixels, got {width}")
        self.width, self.cutoff = float(width), float(cutoff)

    def gain(self, h: int, w: int, dtype: torch.dtype, device) -> Tensor:
        """The real transfer function (h, w // 2 + 1) of the periodic Gaussian kernel."""
        def axis(n: int) -> Tensor:
            d = torch.arange(n, dtype=torch.float64)
            d = torch.minimum(d, n - d)  # periodic distance to pixel 0
            return torch.exp(-0.5 * (d / self.width) ** 2)

        kernel = axis(h)[:, None] * axis(w)[None, :]
        return torch.fft.rfft2(kernel / kernel.sum()).real.to(device=device, dtype=dtype)

    def _apply(self, x: Tensor, inverse: bool) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"blurring measures images (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        k = self.gain(h, w, x.dtype, x.device)
        if inverse:
            keep = k > self.cutoff * k.max()
            k = torch.where(keep, 1.0 / torch.where(keep, k, torch.ones_like(k)), torch.zeros_like(k))
        return torch.fft.irfft2(torch.fft.rfft2(x) * k, s=(h, w))

    def __call__(self, x: Tensor) -> Tensor:
        return self._apply(x, inverse=False)

    def pinv(self, y: Tensor) -> Tensor:
        return self._apply(y, inverse=True)

    def display(self, y: Tensor, fill: float = 0.0) -> Tensor:
        return y  # the blurred image itself

    def describe(self) -> dict:
        return {"operator": self.name, "width": self.width, "cutoff": self.cutoff, "boundary": "periodic"}


class Matrix(Operator):
    """A K x D matrix on flattened x: A x = M x, (B, *D) -> (B, K); A^+ by torch.linalg.pinv."""

    name = "matrix"

    def __init__(self, rows: Sequence[Sequence[float]]):
        m = torch.as_tensor(rows, dtype=torch.float64)
        if m.ndim != 2 or m.shape[0] < 1:
            raise ValueError(f"a measurement matrix is a non-empty list of rows (K x D), got shape {tuple(m.shape)}")
        if torch.linalg.matrix_rank(m) < m.shape[0]:
            raise ValueError(f"the measurement matrix's rows must be linearly independent, got {m.tolist()}")
        self.matrix, self._pinv = m, torch.linalg.pinv(m)

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.matrix.shape[1]:
            raise ValueError(f"a {tuple(self.matrix.shape)} matrix measures x of {self.matrix.shape[1]} features, "
                             f"got shape {tuple(x.shape)}")
        return flat @ self.matrix.to(x.device, x.dtype).T

    def pinv(self, y: Tensor) -> Tensor:
        return y @ self._pinv.to(y.device, y.dtype).T

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.pinv(y - self(x)).reshape(x.shape)

    def null_direction(self) -> Tensor:
        """A unit vector (D,) with M v = 0, float64 (the last right-singular vector); ValueError when M has full
        column rank."""
        if self.matrix.shape[0] >= self.matrix.shape[1]:
            raise ValueError("a square or tall matrix with independent rows has no null space")
        return torch.linalg.svd(self.matrix).Vh[-1]

    def describe(self) -> dict:
        return {"operator": self.name, "matrix": self.matrix.tolist()}


def operator_from(spec: Mapping[str, Any], shape: Sequence[int], mask: Optional[Tensor] = None,
                  key: str = "sample.inverse") -> Operator:
    """The operator `spec` names ({"operator": name, and its keys: factor, width, matrix, weights}; a describe()
    round-trips) for items of `shape` (*D), the mask (n, *D) given for "mask". ValueError naming `key`.<field> when
    it does not fit the data: colourisation of other than 3 channels, a factor that does not divide the image
    side, a matrix whose width is not the number of features."""
    shape = tuple(int(s) for s in shape)
    name = spec["operator"]
    if name == "mask":
        if mask is None:
            raise ValueError("the mask operator needs its mask")
        return Mask(mask, (len(mask), *shape))
    if name in ("colorize", "downsample", "blur") and len(shape) != 3:
        raise ValueError(f"{key}.operator: {name} measures images (C, H, W); the data are points of shape {shape}")
    if name == "colorize":
        if shape[0] != 3:
            raise ValueError(f"{key}.operator: colorize needs RGB images; the data have {shape[0]} channel(s)")
        return Colorize(spec.get("weights", LUMA_BT601))
    if name == "downsample":
        factor = int(spec["factor"])
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(f"{key}.factor ({factor}) must divide the image sides {shape[1]} x {shape[2]}")
        return Downsample(factor)
    if name == "blur":
        return Blur(float(spec["width"]), float(spec.get("cutoff", BLUR_CUTOFF)))
    if name == "matrix":
        rows = spec.get("matrix")
        features = math.prod(shape)
        if not rows or len(rows[0]) != features:
            raise ValueError(f"{key}.matrix needs rows of {features} entries (the data's features), got "
                             f"{rows!r}")
        try:
            return Matrix(rows)
        except ValueError as err:
            raise ValueError(f"{key}.matrix: {err}") from None
    raise ValueError(f"unknown {key}.operator {name!r}")


def measure(operator: Operator, x: Tensor, noise: float, generator: rng.Generator) -> Tensor:
    """The measurement y = A x + noise n (B, *K), n standard normal from `generator` (the measurement's own)."""
    if not noise >= 0:
        raise ValueError(f"the measurement noise must be >= 0, got {noise}")
    y = operator(x)
    return y + noise * rng.randn_like(y, generator) if noise > 0 else y


# --------------------------------------------------------------------------- step wrappers


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def perturbed_measurement(x: Tensor, operator: Operator, y: Tensor, t: float, process: Process,
                          generator: rng.Generator, t_end: Optional[float] = None) -> Tensor:
    """x with its measured part set to a draw of (A x_t) | y, m(t) y + std(t) A z with z ~ N(0, I) like x (the
    process's marginal seen through A), or to y exactly, with no draw, at t_end or a clean time. Shapes (B, *D)."""
    y = y.to(x.dtype)
    if t != t_end and not is_clean(process, t):
        m, std = process.marginal(_times(x, t))
        y = (append_dims(m, y.ndim).to(x.dtype) * y
             + append_dims(std, y.ndim).to(x.dtype) * operator(rng.randn_like(x, generator)))
    return operator.project(x, y)


def replace(step: Step, operator: Operator, y: Tensor, t_end: Optional[float] = None) -> Step:
    """Song et al. 2021 (appendix I): after the inner step, the measured part set to the measurement perturbed to
    t_next, x <- x + A^+ (m y + std A z - A x) (B, *D); at t_end (None: only where std = 0), to y exactly.

    Approximate: the generated part never sees the noise the measured part was drawn with (RePaint's motivation);
    on the mixture oracles of tests/test_inpaint.py and tests/test_inverse.py it is biased after a plain reverse
    diffusion step and not measurably so with the PC sampler's Langevin corrector."""

    def replace_step(x, t_cur, t_next, fn, process, generator):
        x = step(x, t_cur, t_next, fn, process, generator)
        return perturbed_measurement(x, operator, y, t_next, process, generator, t_end)

    return replace_step


def langevin(step: Step, operator: Operator, y: Tensor, t_end: Optional[float] = None) -> Step:
    """Song & Ermon 2019 (arXiv:1907.05600), appendix B, Algorithm 2, around annealed_langevin_step (B, *D).

    At the start of level sigma_i (= t_next) it draws the measured part once, m y + std A z; every score evaluation
    of the level's T inner Langevin steps sees x with that measured part, and so does the step's result. Replacing
    before each evaluation is the same as Algorithm 2's replacement after each inner update: the update of the
    generated part reads the state only through the score, and the measured part's update is overwritten. Needs an
    inner step that evaluates the score at t_next only (annealed Langevin); at t_end the measured part is y."""

    def langevin_step(x, t_cur, t_next, fn, process, generator):
        held = perturbed_measurement(x, operator, y, t_next, process, generator)
        held_y = operator(held)  # the level's measured part, put back into every state the score sees

        def fn_held(x_in, t):
            return fn(operator.project(x_in, held_y), t)

        x = step(held, t_cur, t_next, fn_held, process, generator)
        return operator.project(x, y.to(x.dtype) if t_next == t_end else held_y)

    return langevin_step


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


def repaint(step: Step, operator: Operator, y: Tensor, t_end: Optional[float] = None) -> Step:
    """Lugmayr et al. 2022 (arXiv:2201.09865), Algorithm 1, for a walk over `repaint_grid` (B, *D).

    Going up (t_next > t_cur) it re-noises the whole state by the forward transition,
    x_{t_next} = alpha x + sigma_ts z with (alpha, sigma_ts) = process.transition(t_next, t_cur) (their q(x_t | x_{t-1}));
    going down it is `replace`."""
    down = replace(step, operator, y, t_end)

    def repaint_step(x, t_cur, t_next, fn, process, generator):
        if t_next > t_cur:
            alpha, sigma = process.transition(_times(x, t_next), _times(x, t_cur))
            b = lambda v: append_dims(v, x.ndim).to(x.dtype)  # noqa: E731
            return b(alpha) * x + b(sigma) * rng.randn_like(x, generator)
        return down(x, t_cur, t_next, fn, process, generator)

    return repaint_step


def residual_gradient(x: Tensor, t_cur: float, fn: Callable, process: Process, operator: Operator,
                      y: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_{x_t} ||y - A x0_hat(x_t)||^2 per sample (B, *D), ||y - A x0_hat(x_t)|| (B,)), x0_hat Tweedie's estimate
    from the score at t_cur, by autograd through fn (one more network evaluation)."""
    t = _times(x, t_cur)
    with torch.enable_grad():  # samplers run under no_grad; the gradient is w.r.t. x_t only
        x_in = x.detach().requires_grad_(True)
        r = y.to(x.dtype) - operator(x0_from_score(x_in, fn(x_in, t), t, process))
        sq = r.pow(2).flatten(1).sum(1)
        (grad,) = torch.autograd.grad(sq.sum(), x_in)  # samples are independent: row b is the gradient of sq[b]
    return grad, sq.detach().sqrt()


def _gradient_step(x: Tensor, grad: Tensor, norm: Tensor, size: float) -> Tensor:
    """x - size / ||r|| grad ||r||^2 per sample (a residual of 0 has a gradient of 0: no step)."""
    return x - append_dims(size / norm.clamp_min(torch.finfo(x.dtype).tiny), x.ndim) * grad


def mcg(step: Step, operator: Operator, y: Tensor, t_end: Optional[float] = None, *, alpha: float) -> Step:
    """Chung et al. 2022's manifold-constrained gradient (arXiv:2206.00941, sec. 3, Fig. 1 steps 1-5), (B, *D).

    x' = step(x_t); x'' = x' - alpha / ||r|| grad_{x_t} ||r||^2 with r = y - A x0_hat(x_t) per sample; then the
    `replace` projection at t_next. alpha / ||r|| is the paper's normalised step; the MCG code's step on 256 x 256
    images, grad ||r|| with scale 1, is alpha = 0.5. Not a posterior correction: a large alpha biases the generated
    part (tests/test_inpaint.py measures it)."""
    if not alpha >= 0:
        raise ValueError(f"MCG's step size alpha must be >= 0, got {alpha}")

    def mcg_step(x, t_cur, t_next, fn, process, generator):
        grad, norm = residual_gradient(x, t_cur, fn, process, operator, y)
        x = _gradient_step(step(x, t_cur, t_next, fn, process, generator), grad, norm, alpha)
        return perturbed_measurement(x, operator, y, t_next, process, generator, t_end)

    return mcg_step


def dps(step: Step, operator: Operator, y: Tensor, t_end: Optional[float] = None, *, zeta: float) -> Step:
    """Diffusion posterior sampling, Chung et al. 2023 (arXiv:2209.14687), Algorithm 1 (Gaussian noise), (B, *D).

    x' = step(x_t); x_{t_next} = x' - zeta_t grad_{x_t} ||y - A x0_hat(x_t)||^2 with the paper's step
    zeta_t = zeta / ||y - A x0_hat(x_t)|| (sec. 4, "zeta_i = zeta' / ||y - A(x0_hat)||"); no projection, so y may
    be noisy. The DPS code's `scale` multiplies grad ||r|| = grad ||r||^2 / (2 ||r||): its scale s is zeta = s / 2.
    Approximate: x0_hat's Gaussian likelihood p(y | x_t) ~ N(A x0_hat, ...) is the method's own approximation."""
    if not zeta >= 0:
        raise ValueError(f"DPS's step size zeta must be >= 0, got {zeta}")

    def dps_step(x, t_cur, t_next, fn, process, generator):
        grad, norm = residual_gradient(x, t_cur, fn, process, operator, y)
        return _gradient_step(step(x, t_cur, t_next, fn, process, generator), grad, norm, zeta)

    return dps_step


WRAPPERS: dict[str, Callable[..., Step]] = {"replace": replace, "langevin": langevin, "repaint": repaint, "mcg": mcg,
                                            "dps": dps}
# The method options each method takes (besides the inner step, the operator, y and t_end).
METHOD_OPTIONS = {"replace": (), "langevin": (), "repaint": ("jump", "resamples"), "mcg": ("alpha",),
                  "dps": ("zeta",)}
STEP_SIZES = {"mcg": "alpha", "dps": "zeta"}


# --------------------------------------------------------------------------- the solver


def check_combination(method: str, sampler: str, model_kind: str, options: Mapping[str, Any],
                      noise: float = 0.0) -> None:
    """ValueError, naming what works, for a method that does not apply to the sampler, the model or noisy y."""
    if method not in WRAPPERS:
        raise ValueError(f"unknown inverse-problem method {method!r}; allowed: {', '.join(METHODS)}")
    if sampler == "ode" and options.get("ode_method") not in FIXED_STEP_ODE:
        raise ValueError(f"the methods wrap a step over a grid, and the {options.get('ode_method')!r} ODE solver "
                         f"picks its own times: use ode_method {' or '.join(FIXED_STEP_ODE)}, or the samplers "
                         f"{', '.join(s for s in GRID_SAMPLERS if s != 'ode')}")
    if method == "langevin" and (sampler != "annealed_langevin" or model_kind == "kernel"):
        raise ValueError(f"method 'langevin' is Song & Ermon's Algorithm 2 and wraps the annealed_langevin sampler of "
                         f"a score model only, not {sampler!r} ({model_kind}); with other samplers use replace, "
                         "repaint, mcg or dps")
    if method in STEP_SIZES and model_kind == "kernel":
        raise ValueError(f"method {method!r} differentiates Tweedie's x0_hat of a score model; a learned reverse "
                         "kernel has none: use replace or repaint")
    if noise > 0 and method in ("replace", "langevin", "repaint"):
        raise ValueError(f"method {method!r} puts the measurement into x exactly, which is wrong for a noisy one "
                         f"(noise {noise}): use dps (or mcg)")


def solve(sampler: str, model_kind: str, fn, process: Process, operator: Operator, y: Tensor, shape: Sequence[int],
          generator: rng.Generator, steps: Optional[int], options: Mapping[str, Any], method: str, *,
          noise: float = 0.0, box: Optional[tuple[float, float]] = None, progress: bool = False,
          record: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
          **method_options) -> SampleResult:
    """Draw x (B, *D) = `shape` given the measurement y = A x + noise n (B, *K) by `method`.

    The inner (step, grid) is pipeline.samplers.plan's for `sampler` with `options` (as for draw), wrapped by
    `method` (replace, langevin, repaint, mcg, dps; see the module docstring) and walked by the one walker from a
    prior draw, its measured part set to y perturbed to grid[0] for the projecting methods. method_options: jump,
    resamples (repaint), alpha (mcg), zeta (dps). `box` (low, high): the range the data are clipped to afterwards
    (pixels); the projecting methods then end on the nearest point of {A x = y} inside it (Operator.project_box),
    so that the clipping keeps A x = y. x lives on `device` (default y's) with `dtype` (default y's); nfe counts
    every call of fn (the gradient methods' extra evaluation included)."""
    check_combination(method, sampler, model_kind, options, noise)
    if method in STEP_SIZES and STEP_SIZES[method] not in method_options:
        raise ValueError(f"method {method!r} needs its step size: pass {STEP_SIZES[method]} (e.g. 0.5 for mcg on "
                         "256x256 images as the MCG code; low-dimensional data need far less, e.g. 0.01 on 2-D points)")
    unknown = set(method_options) - set(METHOD_OPTIONS[method])
    if unknown:
        takes = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise ValueError(f"method {method!r} takes no option {', '.join(sorted(unknown))}; it takes: {takes}")
    device, dtype = y.device if device is None else device, y.dtype if dtype is None else dtype
    y = y.to(device=device, dtype=dtype)
    step, grid, desc = plan(sampler, model_kind, process, steps, options)
    t_end = float(grid[-1])
    extra = {k: method_options[k] for k in METHOD_OPTIONS[method] if k in method_options}
    if method == "repaint":
        grid = repaint_grid(grid, extra.pop("jump", REPAINT_JUMP), extra.pop("resamples", REPAINT_RESAMPLES))
    wrapped = WRAPPERS[method](step, operator, y, t_end, **extra)
    x = process.prior_sample(tuple(shape), generator, device, dtype)
    if method in PROJECTING:
        x = perturbed_measurement(x, operator, y, float(grid[0]), process, generator, t_end)
    result = walk(wrapped, x, grid, fn, process, generator, record=record, progress=progress,
                  desc=f"{desc}, {method} ({operator.name})")
    if box is not None and method in PROJECTING:
        result = dataclasses.replace(result, x=operator.project_box(result.x, y, *box))
    return result


# --------------------------------------------------------------------------- the Gaussian-mixture oracle


def gmm_posterior(mixture, matrix: Tensor, y: Tensor, noise: float) -> tuple[Tensor, Tensor, Tensor]:
    """The exact p(x | y) of a Gaussian mixture prior and y = M x + noise n (M (K, D), y (B, K)), float64.

    A mixture again (each component conditioned on a linear Gaussian observation, e.g. Bishop 2006, eqs. 2.113-2.117):
    with S_k = M C_k M^T + noise^2 I, weights (B, J) proportional to pi_k N(y; M mu_k, S_k), means (B, J, D)
    mu_k + C_k M^T S_k^-1 (y - M mu_k), covariances (J, D, D) C_k - C_k M^T S_k^-1 M C_k."""
    m = matrix.to(torch.float64)
    yf = y.reshape(y.shape[0], -1).to(torch.float64)
    mu, cov, w = mixture.means.to(torch.float64), mixture.covs.to(torch.float64), mixture.weights.to(torch.float64)
    gain_t = cov @ m.T  # (J, D, K): C_k M^T
    s = m @ gain_t + noise ** 2 * torch.eye(m.shape[0], dtype=torch.float64)  # (J, K, K)
    chol = torch.linalg.cholesky(s)
    diff = yf[:, None, :] - (mu @ m.T)[None]  # (B, J, K)
    solved = torch.cholesky_solve(diff[..., None], chol.expand(yf.shape[0], -1, -1, -1))[..., 0]  # S^-1 diff
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_w = torch.log(w) - 0.5 * ((diff * solved).sum(-1) + logdet + m.shape[0] * math.log(2 * math.pi))
    means = mu[None] + torch.einsum("jdk,bjk->bjd", gain_t, solved)
    covs = cov - gain_t @ torch.cholesky_solve(gain_t.transpose(1, 2), chol)
    return torch.softmax(log_w, dim=1), means, covs


def gmm_posterior_cdf(mixture, matrix: Tensor, y: Tensor, noise: float, x: Tensor, direction: Tensor) -> Tensor:
    """F(v^T x | y) under the exact posterior (gmm_posterior) of the coordinate of x (B, D) along `direction` v (D,)
    (a unit vector in the null space of M for the part no measurement sees). Uniform on [0, 1] for x drawn from
    p(x | y) (the probability-integral transform): a Kolmogorov-Smirnov test of it measures a solver. (B,)."""
    weights, means, covs = gmm_posterior(mixture, matrix, y, noise)
    v = direction.to(torch.float64)
    u = x.reshape(x.shape[0], -1).to(torch.float64) @ v
    var = torch.einsum("d,jde,e->j", v, covs, v)
    z = (u[:, None] - means @ v) / var.sqrt()[None]
    return (weights * torch.special.ndtr(z)).sum(1)
