"""Consistency models against closed forms: the multistep sampler's grid and steps, the distillation loss's draws and
teacher step, and its minimiser (the exact ODE map of a Gaussian mixture, computed by RK45, scores ~0 where the
mixture's denoiser does not)."""

from __future__ import annotations

import pytest
import torch

from pipeline.consistency import ConsistencyDistillationLoss, distillation_grid, make_x0_fn, pseudo_huber
from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn, exact_velocity_fn
from pipeline.processes import EDMProcess, LinearPath, VPSDE
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw, plan
from pipeline.samplers.fast import denoised
from pipeline.samplers.ode import ode_step

MIX = GaussianMixture.from_params([0.3, 0.7], [[-2.0, 0.0], [1.5, 1.0]], [[0.3, 0.5], [[0.6, 0.2], [0.2, 0.4]]])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("process, want", [(EDMProcess(), [80.0, 2.5152, 0.0]), (LinearPath(0.0), [1.0, 2 / 3, 0.0]),
                                           (VPSDE(), None)], ids=["edm", "rf", "vp"])
def test_two_consistency_steps_jump_from_t_max_to_a_middle_time_then_to_the_data(process, want):
    """Two steps walk t_max, the middle of a three-level schedule (EDM's ρ-schedule; uniform time on the linear
    path, whose σ(t_max) is infinite), then the data end; one network evaluation each."""
    kind = "velocity" if isinstance(process, LinearPath) else "score"
    _, grid, _ = plan("consistency", kind, process, 2, {"spacing": "auto"})
    assert len(grid) == 3 and float(grid[0]) == process.t_max and float(grid[-1]) <= process.t_min
    if want is not None:
        torch.testing.assert_close(grid, torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)
    _, one, _ = plan("consistency", kind, process, None, {"spacing": "auto"})
    assert one.tolist() == [grid[0].item(), grid[-1].item()]  # steps auto: one jump


def test_the_consistency_step_maps_then_renoises_from_the_sample_generators():
    """Step 1: x0 = f(x_T, T) noised to t_1 with the sample's own draw; the last step returns f's estimate alone. So
    sample i does not depend on the batch it is drawn in."""
    p = EDMProcess()
    fn = exact_score_fn(MIX, p)
    out = draw("consistency", "score", fn, p, (6, 2), SampleGenerators(3, range(6)), 2, {"spacing": "auto"}, record=3)
    (t0, x_T), (t1, x_1), (_, x_end) = out.trajectory
    gens = SampleGenerators(3, range(6))
    prior = p.prior_sample((6, 2), gens)
    torch.testing.assert_close(x_T, prior)
    x0 = denoised(x_T, t0, fn, p)
    z = torch.stack([torch.randn(2, generator=g) for g in gens.generators])  # each sample's next draw
    torch.testing.assert_close(x_1, x0 + t1 * z)
    torch.testing.assert_close(x_end, denoised(x_1, t1, fn, p))
    assert out.nfe == 2
    alone = draw("consistency", "score", fn, p, (2, 2), SampleGenerators(3, range(4, 6)), 2, {"spacing": "auto"})
    torch.testing.assert_close(alone.x, out.x[4:])


@pytest.mark.parametrize("process, num_scales", [(EDMProcess(), 18), (LinearPath(0.0), 10), (VPSDE(), 7)])
def test_distillation_grid_has_n_times_from_t_max_to_t_min(process, num_scales):
    spacing = "time" if isinstance(process, LinearPath) else "karras"
    grid = distillation_grid(process, num_scales, spacing)
    assert len(grid) == num_scales and float(grid[0]) == process.t_max and float(grid[-1]) == process.t_min
    assert (grid[1:] < grid[:-1]).all()


class _X0(torch.nn.Module):
    """A 'network' of the x0 parameterization on EDM's process (conditioning σ itself) returning x0_fn(x, σ)."""

    def __init__(self, x0_fn):
        super().__init__()
        self.x0_fn = x0_fn

    def forward(self, x, cond):
        return self.x0_fn(x.double(), cond.double()).to(x.dtype)


def test_distillation_loss_is_the_metric_between_the_student_at_both_ends_of_a_teacher_heun_step():
    """n uniform over the N − 1 intervals, then z, from the generator; x_hi = x0 + σ_n z; the teacher's Heun step
    (ode_step) to σ_{n+1}; the loss d(f(x_hi, σ_n), f(x_lo, σ_{n+1})) with the pseudo-Huber d."""
    p = EDMProcess()
    grid = distillation_grid(p, 8, "karras")
    teacher = exact_score_fn(MIX, p)
    student = _X0(lambda x, s: 0.9 * MIX.denoise(x, torch.ones_like(s), s))
    x = MIX.sample(16, gen(0))
    loss = ConsistencyDistillationLoss(p, teacher, "x0", grid)(student, x, generator=gen(4))
    g = gen(4)
    n = torch.randint(len(grid) - 1, (16,), generator=g)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    f = make_x0_fn(student, p, "x0")
    for i in range(16):
        hi, lo = float(grid[n[i]]), float(grid[n[i] + 1])
        x_hi = x[i:i + 1] + hi * z[i:i + 1]
        x_lo = ode_step(x_hi, hi, lo, teacher, p, method="heun")
        want = pseudo_huber(f(x_hi, torch.tensor([hi], dtype=x.dtype)), f(x_lo, torch.tensor([lo], dtype=x.dtype)))
        torch.testing.assert_close(loss[i:i + 1], want)


def test_the_exact_ode_map_minimises_the_distillation_loss():
    """The consistency function of the exact teacher is its ODE map to t_min (RK45 on the exact score): its loss is
    the teacher's Heun error alone, far below the loss of the mixture's denoiser E[x0 | x_t], which is no
    consistency function (it moves along a trajectory)."""
    p = EDMProcess()
    teacher = exact_score_fn(MIX, p)

    def ode_map(x, sigma):
        """x at σ carried by the exact probability-flow ODE dx/dσ = −σ score to σ_min (RK45, tight tolerances)."""
        out = x.clone()
        for s in torch.unique(sigma):
            rows = sigma == s
            if float(s) > p.t_min:
                out[rows] = _integrate(x[rows], float(s))
        return out

    def _integrate(start, sigma):
        from scipy import integrate

        def drift(t, y):
            at = torch.full((start.shape[0],), t, dtype=torch.float64)
            return (-t * teacher(torch.from_numpy(y).reshape(start.shape), at)).reshape(-1).numpy()

        sol = integrate.solve_ivp(drift, (sigma, p.t_min), start.reshape(-1).numpy(), rtol=1e-9, atol=1e-9)
        return torch.from_numpy(sol.y[:, -1]).reshape(start.shape)

    grid = distillation_grid(p, 40, "karras")
    x = MIX.sample(200, gen(1))
    loss = ConsistencyDistillationLoss(p, teacher, "x0", grid)
    exact = loss(_X0(ode_map), x, generator=gen(2))
    denoiser = loss(_X0(lambda x, s: MIX.denoise(x, torch.ones_like(s), s)), x, generator=gen(2))
    assert float(exact.mean()) < 0.02 * float(denoiser.mean()), (float(exact.mean()), float(denoiser.mean()))


def test_velocity_teachers_distil_through_their_velocity():
    """On the linear path the teacher's step walks the velocity and the student's f is its x0 from the velocity,
    defined at t = 1 where Tweedie's is not: the loss is finite on every interval, t_max's included."""
    p = LinearPath(0.0)
    grid = distillation_grid(p, 5, "time")
    net = torch.nn.Linear(2, 2)
    student = lambda x, c: net(x)  # noqa: E731
    loss = ConsistencyDistillationLoss(p, exact_velocity_fn(MIX, p), "velocity", grid, field="velocity")
    value = loss(student, MIX.sample(64, gen(0)).float(), generator=gen(1))
    assert value.shape == (64,) and torch.isfinite(value).all()
    value.mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
