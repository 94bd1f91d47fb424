"""Consistency models from a trained diffusion or flow model: distillation (Song et al. 2023, arXiv:2303.01469,
Algorithm 2) or easy consistency tuning (Geng et al. 2024, arXiv:2406.14548): train f(x_t, t) to give the same data
estimate at neighbouring times of one trajectory.

For data x0, an interval n of the discretisation t_max = t_0 > ... > t_{N−1} = t_min and z ~ N(0, I): x_hi =
m(t_n) x0 + std(t_n) z, one Heun step of the teacher's ODE from t_n to t_{n+1} gives x_lo, and the loss is
d(f_θ(x_hi, t_n), f_θ⁻(x_lo, t_{n+1})). Choices, each from a later paper of the same line:

- θ⁻ = stopgrad(θ) (Song & Dhariwal 2023, arXiv:2310.14189, sec. 3.2: the EMA teacher of the first paper is not
  needed; Geng et al. 2024 keep it so), so the target is the student itself under no_grad;
- d is the pseudo-Huber metric sqrt(|a − b|² + c²) − c with c = 0.00054 √D (Song & Dhariwal 2023, sec. 3.3), LPIPS
  being an ImageNet network this project does not ship;
- f is the network's own x0_hat (Tweedie's from a score, or from a flow's velocity), initialised from the teacher:
  easy consistency tuning's parameterization (Geng et al. 2024, arXiv:2406.14548), where the diffusion model's
  denoiser is already a consistency function at t_min (x0_hat ≈ x where std ≈ 0) and the boundary condition holds
  without an extra c_skip.

The ODE step asks the process for its field: the probability-flow drift of a score, or a flow's velocity
(pipeline.samplers.ode.ode_field); shapes (B, *D), times per example.

Easy consistency tuning (ConsistencyTuningLoss) needs no teacher step: both points lie on the conditional path of one
data point and one noise, x_t = m(t) x0 + std(t) z and x_r = m(r) x0 + std(r) z (the exact trajectory of the
conditional ODE; its mean given x_t is a first-order step of the teacher's ODE, DDIM's, Euler's on EDM's process, with
the true denoiser in the teacher's place), r < t from a mapping that moves r towards t as
training goes on (continuous-time consistency training fine-tuned from the diffusion model, Geng et al. sec. 3).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pipeline import rng
from pipeline.parameterization import bind_labels, score_from_output, x0_from_score, x0_from_velocity
from pipeline.processes import Process, append_dims
from pipeline.samplers.fast import fast_grid, sigma_of, time_of_sigma
from pipeline.samplers.ode import ode_field


def make_x0_fn(model: nn.Module, process: Process, parameterization: str) -> Callable[[Tensor, Tensor], Tensor]:
    """x0_hat(x, t) of a network of this parameterization, t (B,): from its velocity, or Tweedie's from its score."""

    def x0_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, process.conditioning(t).to(x.dtype))
        if parameterization == "velocity":
            return x0_from_velocity(out, x, t, process)
        return x0_from_score(x, score_from_output(out, x, t, process, parameterization), t, process)

    return x0_fn


def distillation_grid(process: Process, num_scales: int, spacing: str) -> Tensor:
    """The N = num_scales times t_max → t_min of the teacher's discretisation, float64: the few-step grid (EDM's
    ρ-schedule, as Song et al.; uniform time where σ(t_max) is infinite) with N times from t_max to t_min. A clean end
    below t_min (σ = 0 at t = 0 of VP or EDM, where no score exists) is left out; the linear path's t_min is 0."""
    if num_scales < 2:
        raise ValueError(f"consistency distillation needs num_scales >= 2 times, got {num_scales}")
    grid = fast_grid(process, num_scales - 1, spacing)
    if float(grid[-1]) < process.t_min:
        grid = fast_grid(process, num_scales, spacing)[:-1]
    return grid


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(|a − b|² + c²) − c per example, c = 0.00054 √D (Song & Dhariwal 2023, sec. 3.3), (B,); for |a − b| ≫ c
    the L2 distance, easy consistency tuning's metric (its c = 0, whose gradient is undefined where a = b)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c


class ConsistencyDistillationLoss:
    """loss(model, x, cond=None, generator=None) -> (B,): Algorithm 2's loss for one random interval per example.

    teacher: the trained model's fn (a score_fn, or a velocity_fn with field "velocity"), frozen; parameterization:
    what the student network outputs (the teacher's, whose weights it starts from); grid: distillation_grid's times.
    Draws n, then z, from `generator`."""

    def __init__(self, process: Process, teacher: Callable, parameterization: str, grid: Tensor,
                 field: str = "score"):
        if len(grid) < 2:
            raise ValueError(f"consistency distillation needs at least two times, got {len(grid)}")
        self.process, self.parameterization, self.grid = process, parameterization, grid.to(torch.float64)
        self.drift = ode_field(process, teacher, field)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        p, b = self.process, x.shape[0]
        n = torch.randint(len(self.grid) - 1, (b,), generator=generator)
        t_hi = self.grid[n].to(device=x.device, dtype=x.dtype)
        t_lo = self.grid[n + 1].to(device=x.device, dtype=x.dtype)
        z = rng.randn_like(x, generator)
        x_hi = p.perturb(x, t_hi, z)
        dt = append_dims(t_lo - t_hi, x.ndim)
        with torch.no_grad():  # the teacher's Heun step (Karras et al. 2022, Algorithm 1), then the target
            d_hi = self.drift(x_hi, t_hi)
            x_euler = x_hi + dt * d_hi
            x_lo = x_hi + 0.5 * dt * (d_hi + self.drift(x_euler, t_lo))
            f = make_x0_fn(bind_labels(model, cond), p, self.parameterization)
            target = f(x_lo, t_lo)
        return pseudo_huber(f(x_hi, t_hi), target)


class SigmaInverse:
    """t(σ) of a continuous process on [t_min, t_max] by interpolation in log σ, float64, shape of σ: a table of
    `size` bisections (pipeline.samplers.fast.time_of_sigma) once, then a search per call instead of a bisection per
    training step (~0.1 s on a VP batch of 8,192 here). σ outside the table (the process's ends, or 1e-6 and 1e6
    where σ reaches 0 or ∞) maps to its end; t increases with σ."""

    def __init__(self, process: Process, size: int = 4097):
        ends = sigma_of(process, torch.tensor([process.t_min, process.t_max], dtype=torch.float64))
        lo, hi = max(float(ends[0]), 1e-6), min(float(ends[1]), 1e6)
        self.log_sigma = torch.linspace(math.log(lo), math.log(hi), size, dtype=torch.float64)
        self.t = time_of_sigma(process, self.log_sigma.exp())

    def __call__(self, sigma: Tensor) -> Tensor:
        q = sigma.to(torch.float64).clamp(min=1e-300).log().clamp(float(self.log_sigma[0]), float(self.log_sigma[-1]))
        i = torch.searchsorted(self.log_sigma, q).clamp(1, len(self.t) - 1)
        w = (q - self.log_sigma[i - 1]) / (self.log_sigma[i] - self.log_sigma[i - 1])
        return self.t[i - 1] + w * (self.t[i] - self.t[i - 1])


# Easy consistency tuning's defaults (Geng et al. 2024, the authors' CIFAR-10 setting): r/t = 1 − q^−(stage+1) (1 + k
# sigmoid(−b σ_t)) with q = 2, k = 8, b = 1 over 8 stages, and the weight 1/σ_t² + 1/σ_data² (their "SNR +
# 1/σ_data²") with σ_data = 0.5. Their σ_t ~ lognormal(−1.1, 2.0) is EDM's training law widened; here t is drawn from
# the process's own training law (process.sample_time: EDM's lognormal, uniform time elsewhere), which tuning
# continues: on the linear path their law leaves t near 1, where one step starts, almost untrained (swiss roll, 1
# NFE, lr 3e-5: cd 0.60 with theirs, 0.47 with the process's).
ECT_Q, ECT_K, ECT_B, ECT_STAGES, ECT_SIGMA_DATA = 2.0, 8.0, 1.0, 8, 0.5


class ConsistencyTuningLoss:
    """loss(model, x, cond=None, generator=None) -> (B,): easy consistency tuning (Geng et al. 2024, sec. 3).

    t from the process's training law, then z, from `generator`; σ = std / m; r the process's time of σ_r = σ_t
    r/t(σ_t) (SigmaInverse; clamped to [t_min, t_max]); x_t, x_r on the conditional path
    of (x0, z); loss w(σ_t) d(f_θ(x_t, t), stopgrad f_θ(x_r, r)), the target x0 itself where σ_r is below the
    process's σ(t_min) (ECT's r = 0). `set_step(step)` (the training loop, before each step) picks the stage
    ⌊stages · step / total_steps⌋: Δt halves (q = 2) from stage to stage, so f is asked to agree over ever shorter
    intervals. A continuous process only (a discrete chain's levels would round r onto t)."""

    def __init__(self, process: Process, parameterization: str, total_steps: int, stages: int = ECT_STAGES):
        if not process.continuous:
            raise ValueError("easy consistency tuning draws continuous times; a discrete process (DDPM's chain, "
                             "NCSN's scales) has only its own levels: use consistency distillation")
        if total_steps < 1 or stages < 1:
            raise ValueError(f"easy consistency tuning needs total_steps >= 1 and stages >= 1, got {total_steps}, "
                             f"{stages}")
        self.process, self.parameterization = process, parameterization
        self.total_steps, self.stages, self.step = int(total_steps), int(stages), 0
        self.sigma_min = float(sigma_of(process, torch.tensor([process.t_min], dtype=torch.float64)))
        self.time_of = SigmaInverse(process)

    def set_step(self, step: int) -> None:
        """The optimisation step about to run (a resumed run is told its own): it sets the stage of the mapping."""
        self.step = int(step)

    @property
    def stage(self) -> int:
        return min(self.stages * self.step // self.total_steps, self.stages - 1)

    def r_sigma(self, sigma: Tensor) -> Tensor:
        """σ_r of σ_t (float64): σ_t (1 − q^−(stage+1) (1 + k sigmoid(−b σ_t))), at least 0 (ECT's sigmoid mapping)."""
        decay = ECT_Q ** -(self.stage + 1)
        return (sigma * (1 - decay * (1 + ECT_K * torch.sigmoid(-ECT_B * sigma)))).clamp(min=0)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        p, b = self.process, x.shape[0]
        sigma_t = sigma_of(p, p.sample_time(b, generator).to(torch.float64))
        z = rng.randn_like(x, generator)
        sigma_r = self.r_sigma(sigma_t)
        clean = sigma_r <= self.sigma_min
        t, r = self.time_of(torch.cat([sigma_t, sigma_r])).chunk(2)
        t, r = t.to(device=x.device, dtype=x.dtype), r.to(device=x.device, dtype=x.dtype)
        f = make_x0_fn(bind_labels(model, cond), p, self.parameterization)
        with torch.no_grad():
            target = torch.where(append_dims(clean.to(x.device), x.ndim), x, f(p.perturb(x, r, z), r))
        sigma = sigma_of(p, t.double()).clamp(min=self.sigma_min)  # σ of the clamped t, where the network works
        weight = (1 / sigma ** 2 + 1 / ECT_SIGMA_DATA ** 2).to(device=x.device, dtype=x.dtype)
        return weight * pseudo_huber(f(p.perturb(x, t, z), t), target)


def consistency_loss(method: str, process: Process, teacher: Callable, parameterization: str, field: str,
                     num_scales: int, spacing: str, total_steps: int):
    """The distill stage's loss of distill.method: "cd" (ConsistencyDistillationLoss over distillation_grid's
    num_scales times, the teacher's field) or "ect" (ConsistencyTuningLoss over total_steps, no teacher step)."""
    if method == "cd":
        return ConsistencyDistillationLoss(process, teacher, parameterization,
                                           distillation_grid(process, num_scales, spacing), field=field)
    if method == "ect":
        return ConsistencyTuningLoss(process, parameterization, total_steps)
    raise ValueError(f"unknown consistency method {method!r}; allowed: cd, ect")
