"""Consistency models against closed forms: the multistep sampler's grid and steps, the distillation loss's draws and
teacher step, and its minimiser (the exact ODE map of a Gaussian mixture, computed by RK45, scores ~0 where the
mixture's denoiser does not); easy consistency tuning's mapping r(t) and stages (Geng et al.'s formula), its draws,
target and stop-gradient."""

from __future__ import annotations

import pytest
import torch

from pipeline.consistency import (ConsistencyDistillationLoss, ConsistencyTuningLoss, SigmaInverse,
                                  consistency_loss, distillation_grid, make_x0_fn, pseudo_huber)
from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn, exact_velocity_fn
from pipeline.processes import EDMProcess, LinearPath, VPSDE
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw, plan
from pipeline.samplers.fast import denoised, sigma_of, time_of_sigma
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


SHAPES = {"B2": (2,), "B1x8x8": (1, 8, 8)}


class Student(torch.nn.Module):
    """f = w x with one weight: a student whose loss and gradient any shape can carry."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c):
        return self.w * x


def _trains_a_student(loss, shape: tuple[int, ...]) -> None:
    """loss on 8 examples of `shape`: one finite value each, the same bits at the same seed, a finite gradient."""
    x = torch.randn(8, *shape, generator=gen(0))
    student = Student()
    a = loss(student, x, generator=gen(1))
    assert a.shape == (8,) and torch.isfinite(a).all()
    assert torch.equal(a, loss(student, x, generator=gen(1)))
    a.mean().backward()
    assert student.w.grad is not None and torch.isfinite(student.w.grad)


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity of N(0, I) data, any shape: x_t ~ N(0, v I), v = (1 − t)² + t², so
    E[x0 | x] = (1 − t) x / v, E[z | x] = t x / v and v' = −E[x0 | x] + E[z | x] = (2t − 1) x / v."""
    b = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (2 * b - 1) * x / ((1 - b) ** 2 + b ** 2)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("sampler, options, steps, nfe", [
    ("ode", {"ode_method": "euler"}, 20, 20), ("ode", {"ode_method": "heun"}, 10, 20),
    ("ode", {"ode_method": "rk45", "rtol": 1e-5, "atol": 1e-5}, None, None), ("dpm_solver", {}, 20, 20),
    ("consistency", {}, 2, 2)])
def test_every_velocity_walk_runs_on_points_and_images(sampler, options, steps, nfe, shape):
    """Each sampler a velocity walks, on (B, 2) and (B, 1, 8, 8), from N(0, I) with the exact velocity of N(0, I)
    data: the shape, finite samples, the walker's count, and std within 0.1 of 1 for the ODE samplers at 20
    evaluations (the law is kept; at 4 Euler steps it is 0.81, the first-order error of this curved path)."""
    p = LinearPath(0.0)
    n = 256
    out = draw(sampler, "velocity", _gaussian_velocity, p, (n, *shape), SampleGenerators(0, range(n)), steps,
               {"spacing": "auto", **options})
    assert out.x.shape == (n, *shape) and torch.isfinite(out.x).all()
    assert nfe is None or out.nfe == nfe
    if sampler != "consistency":  # the ODE maps N(0, I) to the data law N(0, I)
        assert abs(float(out.x.std()) - 1.0) < 0.1


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("process, param, field", [(EDMProcess(), "x0", "score"), (VPSDE(), "eps", "score"),
                                                   (LinearPath(0.0), "velocity", "velocity")],
                         ids=["edm", "vp", "rf"])
def test_distillation_loss_runs_on_points_and_images_and_trains_the_student(process, param, field, shape):
    """The distillation loss on (B, 2) and (B, 1, 8, 8): one value per example, finite, a gradient for the
    student, the same bits at the same seed; the consistency sampler walks the score teacher's grid on images too."""
    def gaussian_score(x, t):  # N(0, I) data through the process: x_t ~ N(0, (m² + std²) I)
        m, std = process.marginal(t)
        return -x / (m ** 2 + std ** 2).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    teacher = _gaussian_velocity if field == "velocity" else gaussian_score
    spacing = "time" if field == "velocity" else "karras"
    loss = ConsistencyDistillationLoss(process, teacher, param, distillation_grid(process, 6, spacing), field=field)
    _trains_a_student(loss, shape)
    out = draw("consistency", "velocity" if field == "velocity" else "score", teacher, process, (4, *shape),
               SampleGenerators(0, range(4)), 2, {"spacing": "auto"})
    assert out.x.shape == (4, *shape) and torch.isfinite(out.x).all() and out.nfe == 2


def _ect_reference(sigma: torch.Tensor, stage: int) -> torch.Tensor:
    """Geng et al. 2024's sigmoid mapping as written in their paper and code: r = t (1 − (1 + k sigmoid(−b t)) /
    q^(s+1)), clamped at 0, with q = 2, k = 8, b = 1 (t is σ in EDM's units)."""
    return torch.clamp(sigma * (1 - (1 + 8.0 / (1 + torch.exp(sigma))) / 2.0 ** (stage + 1)), min=0)


def test_ect_maps_t_to_r_by_the_papers_sigmoid_rule_and_halves_the_gap_each_stage():
    """σ_r against the paper's formula at every stage; the stage is ⌊8 step / total⌋ (the last one holds to the end),
    so Δσ = σ_t − σ_r at small σ halves from stage to stage; in stage 0, r = 0 below σ = ln 7."""
    loss = ConsistencyTuningLoss(EDMProcess(), "x0", total_steps=800)
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    stages = {0: 0, 99: 0, 100: 1, 450: 4, 799: 7}
    for step, stage in stages.items():
        loss.set_step(step)
        assert loss.stage == stage
        torch.testing.assert_close(loss.r_sigma(sigma), _ect_reference(sigma, stage), rtol=1e-12, atol=0)
    gaps = []
    for step in (300, 400, 500):  # stages 3-5 (in stages 0-1 the gap at small σ is all of σ: r = 0)
        loss.set_step(step)
        gaps.append(float(sigma[0] - loss.r_sigma(sigma[:1])[0]))
    assert gaps[0] / gaps[1] == pytest.approx(2.0) and gaps[1] / gaps[2] == pytest.approx(2.0)
    loss.set_step(0)
    edge = torch.tensor([1.9, 2.0], dtype=torch.float64)  # 1 − (1 + 8 sigmoid(−σ)) / 2 = 0 at σ = ln 7 ≈ 1.95
    assert float(loss.r_sigma(edge)[0]) == 0.0 and float(loss.r_sigma(edge)[1]) > 0.0


@pytest.mark.parametrize("process", [EDMProcess(), VPSDE(), LinearPath(0.0), LinearPath(0.1)],
                         ids=["edm", "vp", "rf", "cfm"])
def test_the_sigma_table_inverts_the_process(process):
    """SigmaInverse (a table of bisections, interpolated in log σ) agrees with the bisection itself within 1e-4 of the
    time span on ECT's σ draws and beyond them, increasing in σ; outside the table, the process's ends."""
    inverse = SigmaInverse(process)
    sigma = torch.exp(-1.1 + 2.0 * torch.randn(4000, generator=gen(0), dtype=torch.float64)).sort().values
    t = inverse(sigma)
    assert float((t - time_of_sigma(process, sigma)).abs().max()) < 1e-4 * (process.t_max - process.t_min)
    assert bool((t[1:] >= t[:-1]).all())
    ends = inverse(torch.tensor([0.0, float("inf")], dtype=torch.float64))
    assert float(ends[0]) == pytest.approx(process.t_min, abs=1e-5) and float(ends[1]) == pytest.approx(process.t_max,
                                                                                                      abs=1e-5)


def test_ect_loss_is_the_metric_between_the_student_at_t_and_its_stopped_self_at_r_on_one_conditional_path():
    """The loss of each example by hand from the same draws (t from the process's training law, then z): x_t and
    x_r share x0 and z; the target is f(x_r, r) under no_grad, or x0 where σ_r is below σ(t_min) (stage 0 at small
    σ); the weight is 1/σ_t² + 1/0.5². Its gradient reaches the student through f(x_t, t) alone."""
    p = EDMProcess()
    net = torch.nn.Linear(2, 2).double()
    student = lambda x, c: net(x)  # noqa: E731
    loss = ConsistencyTuningLoss(p, "x0", total_steps=8)
    x = MIX.sample(64, gen(3))
    for step in (0, 7):
        loss.set_step(step)
        value = loss(student, x, generator=gen(4))
        g = gen(4)
        sigma_t = sigma_of(p, p.sample_time(64, g).double())  # EDM's own: σ = t ~ lognormal(−1.2, 1.2)
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        sigma_r = _ect_reference(sigma_t, loss.stage)
        t, r = loss.time_of(sigma_t), loss.time_of(sigma_r)  # the σ table, checked against bisection above
        f = make_x0_fn(student, p, "x0")
        with torch.no_grad():
            target = torch.where((sigma_r <= p.t_min)[:, None], x, f(x + r[:, None] * z, r))
        weight = 1 / sigma_of(p, t) ** 2 + 4.0
        want = weight * pseudo_huber(f(x + t[:, None] * z, t), target)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-8)
        if step == 0:
            assert bool((sigma_r == 0).any()) and bool((sigma_r > 0).any())
    net.zero_grad()
    value.mean().backward()
    grad = net.weight.grad.clone()
    net.zero_grad()
    with torch.no_grad():
        fixed = f(x + r[:, None] * z, r)
    (weight * pseudo_huber(f(x + t[:, None] * z, t), fixed)).mean().backward()
    torch.testing.assert_close(grad, net.weight.grad, rtol=1e-5, atol=1e-8)


def test_ect_refuses_a_discrete_process_and_the_stage_builds_each_method():
    from pipeline.processes import DiscreteVP, linear_betas

    with pytest.raises(ValueError, match="consistency distillation"):
        ConsistencyTuningLoss(DiscreteVP(linear_betas(100)), "eps", total_steps=10)
    p = EDMProcess()
    teacher = exact_score_fn(MIX, p)
    assert isinstance(consistency_loss("cd", p, teacher, "x0", "score", 6, "karras", 10), ConsistencyDistillationLoss)
    ect = consistency_loss("ect", p, teacher, "x0", "score", 6, "karras", 10)
    assert isinstance(ect, ConsistencyTuningLoss) and ect.total_steps == 10
    with pytest.raises(ValueError, match="allowed: cd, ect"):
        consistency_loss("ict", p, teacher, "x0", "score", 6, "karras", 10)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("process, param", [(EDMProcess(), "x0"), (VPSDE(), "eps"), (LinearPath(0.0), "velocity")],
                         ids=["edm", "vp", "rf"])
def test_ect_loss_runs_on_points_and_images_and_trains_the_student(process, param, shape):
    """Easy consistency tuning on (B, 2) and (B, 1, 8, 8): one finite value per example, a gradient, the same bits
    at the same seed, at the first and the last stage."""
    loss = ConsistencyTuningLoss(process, param, total_steps=16)
    for step in (0, 15):
        loss.set_step(step)
        _trains_a_student(loss, shape)


def test_the_students_learning_rate_is_the_teachers_times_the_measured_factor_of_each_method():
    from pipeline.defaults import distill_lr

    assert distill_lr("auto", 1e-3, "cd") == pytest.approx(3e-5)
    assert distill_lr("auto", 1e-3, "ect") == pytest.approx(3e-4)
    assert distill_lr(2e-4, 1e-3, "ect") == 2e-4
