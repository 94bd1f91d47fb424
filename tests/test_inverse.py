"""Linear inverse problems (pipeline.inverse): the operators against their dense matrices, the exact posterior of a
Gaussian mixture under a linear Gaussian measurement, and every method judged by it.

Analytic first: for a 2-D Gaussian mixture and y = A x + sigma_y n with A a 1 x 2 matrix (not a coordinate mask),
p(x | y) is a mixture in closed form (pipeline.inverse.gmm_posterior); with the exact mixture score, the
probability-integral transform of a solver's x along the null space of A is uniform for an exact solver, and its
Kolmogorov-Smirnov statistic measures each method. Then the operators' algebra on points and images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.gmm import GaussianMixture
from pipeline.inpaint import gmm_conditional
from pipeline.inverse import (LUMA_BT601, Blur, Colorize, Downsample, Mask, Matrix, gmm_posterior, gmm_posterior_cdf,
                              measure, solve)
from pipeline.models import exact_score_fn
from pipeline.processes import VPSDE
from pipeline.rng import SampleGenerators

from oracles import gaussian_score

# x1 + x2 tells the components apart (sums 2 and -4) and they differ along the unseen x1 - x2 by 6, with a
# correlation inside the first: p(x1 - x2 | x1 + x2) is far from p(x1 - x2) (the prior's draws fail the KS below).
MIX = dict(weights=[0.4, 0.6], means=[[3.0, -1.0], [-3.0, -1.0]],
           covs=[[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 1.0]]])
BASE = dict(denoise=True, variance="beta_tilde", eta=0.0, predictor="reverse_diffusion", corrector="none", snr=0.16,
            corrector_steps=1, lam=0.0, ode_method="euler", rtol=1e-5, atol=1e-5, step_size=1e-3, steps_per_scale=3)
VP = VPSDE()
SUM = [[1.0, 1.0]]  # only x1 + x2 is seen


def _dense(operator, shape):
    """The matrix (K, D) of an operator on x of `shape` (*D), column j = A e_j."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return operator(basis).reshape(d, -1).T


OPERATORS = {
    "mask": (lambda: Mask(torch.tensor([[[1.0, 0.0, 1.0, 1.0]] * 4]), (1, 1, 4, 4)), (1, 4, 4)),
    "colorize": (lambda: Colorize(), (3, 4, 4)),
    "downsample": (lambda: Downsample(2), (2, 4, 4)),
    "blur": (lambda: Blur(0.8), (1, 6, 6)),
    "matrix": (lambda: Matrix([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]), (3,)),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_every_operator_is_linear_and_its_pinv_is_the_dense_pseudo_inverse(name):
    """A^+ equals torch.linalg.pinv of A's dense matrix (blur: the truncated one, its gains below the cutoff dropped),
    the projection puts A x = y and is idempotent, on x (B, *D)."""
    make, shape = OPERATORS[name]
    op = make()
    a = _dense(op, shape)
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op(x).reshape(5, -1), x.reshape(5, -1) @ a.T)
    y = op(torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rtol = op.cutoff if name == "blur" else 1e-10  # the dropped gains are at most cutoff x the largest
    pinv = torch.linalg.pinv(a, rtol=rtol)
    torch.testing.assert_close(op.pinv(y).reshape(5, -1), y.reshape(5, -1) @ pinv.T)
    projected = op.project(x, y)
    assert projected.shape == x.shape
    if name != "blur":  # blur measures its dropped frequencies too, faintly: A x = y only where A^+ inverts
        torch.testing.assert_close(op(projected), y)
    torch.testing.assert_close(op.project(projected, y), projected)
    assert op.describe()["operator"] == name


def test_operator_facts_the_docs_state():
    """Colourisation's grey is BT.601 luma and in model space as in pixels; downsampling's A^+ repeats each pixel;
    the blur's gains are those of a normalised kernel (1 at frequency 0)."""
    rgb = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert float(Colorize()(rgb)) == pytest.approx(0.299 * 255)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(Colorize()(2 * x - 1), 2 * Colorize()(x) - 1)  # sum of weights 1: scaling commutes
    assert sum(LUMA_BT601) == pytest.approx(1.0)
    y = torch.arange(4.0).view(1, 1, 2, 2)
    assert Downsample(2).pinv(y)[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    gain = Blur(1.0).gain(8, 8, torch.float64, "cpu")
    assert float(gain[0, 0]) == pytest.approx(1.0) and (gain > 0).all()


def test_bad_operators_are_refused():
    with pytest.raises(ValueError, match="RGB images"):
        Colorize()(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="sides it divides"):
        Downsample(3)(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="integer >= 1"):
        Downsample(0)
    with pytest.raises(ValueError, match="width must be > 0"):
        Blur(0.0)
    with pytest.raises(ValueError, match="measures x of 2 features"):
        Matrix(SUM)(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="linearly independent"):
        Matrix([[1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match="noise must be >= 0"):
        measure(Matrix(SUM), torch.zeros(2, 2), -1.0, torch.Generator())


def test_noisy_refusals_name_what_works():
    y = torch.zeros(3, 1, dtype=torch.float64)
    for method in ("replace", "repaint"):
        with pytest.raises(ValueError, match="noisy one.*use dps"):
            solve("pc", "score", gaussian_score(VP), VP, Matrix(SUM), y, (3, 2), torch.Generator(), 5, BASE, method,
                  noise=0.1)
    with pytest.raises(ValueError, match="pass zeta"):
        solve("pc", "score", gaussian_score(VP), VP, Matrix(SUM), y, (3, 2), torch.Generator(), 5, BASE, "dps")


@pytest.mark.parametrize("method, options", [("replace", {}), ("repaint", dict(jump=2, resamples=2)),
                                             ("mcg", dict(alpha=0.1)), ("dps", dict(zeta=0.5))])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_every_method_on_every_operator(name, method, options):
    """Shapes, dtype, determinism, batch independence; the projecting methods end on A x = y."""
    make, shape = OPERATORS[name]
    op = make()
    x_true = SampleGenerators(3, range(6)).randn((6, *shape), dtype=torch.float64)
    y = op(x_true)

    def run(rows, seed=5):
        part = op if name != "mask" else Mask(op.mask, (len(rows), *shape))
        return solve("pc", "score", gaussian_score(VP), VP, part, y[rows], (len(rows), *shape),
                     SampleGenerators(seed, rows), 6, BASE, method, **options)

    a = run(range(6))
    assert a.x.shape == (6, *shape) and a.x.dtype == torch.float64 and torch.isfinite(a.x).all()
    if method in ("mcg", "dps"):  # one more evaluation per step: the gradient through x0_hat
        plain = solve("pc", "score", gaussian_score(VP), VP, op, y, (6, *shape), SampleGenerators(5, range(6)), 6,
                      BASE, "replace")
        assert a.nfe == 2 * plain.nfe
    torch.testing.assert_close(torch.cat([run(range(0, 3)).x, run(range(3, 6)).x]), a.x, rtol=0, atol=0)
    assert not torch.equal(run(range(6), seed=6).x, a.x)
    if method != "dps" and name != "blur":
        torch.testing.assert_close(op(a.x), y)


def _nearest_in_box(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The nearest z to x in {rows z = y} within [-1, 1]^D, by SciPy's SLSQP (float64, one item): the oracle of
    Operator.project_box. `rows`: (R, D) of full rank spanning the constraint set's normals."""
    from scipy.optimize import minimize

    x0 = x.numpy()
    cons = {"type": "eq", "fun": lambda z: rows.numpy() @ z - y.numpy(), "jac": lambda z: rows.numpy()}
    found = minimize(lambda z: 0.5 * np.sum((z - x0) ** 2), np.clip(x0, -1, 1), jac=lambda z: z - x0,
                     bounds=[(-1.0, 1.0)] * len(x0), constraints=[cons], method="SLSQP",
                     options={"ftol": 1e-12, "maxiter": 1000})
    assert found.success, found.message
    return found.x


@pytest.mark.parametrize("name", list(OPERATORS))
def test_project_box_is_the_nearest_point_of_the_measured_set_in_the_box(name):
    """Operator.project_box against SciPy's constrained least squares on the dense matrices: x far outside [-1, 1],
    y measured from an x in it; the result is in the box, on the set `project` projects onto (A x = y; blur: its
    kept frequencies) and the nearest such point (exact bisection for mask, colorize and downsample; Dykstra's
    iterations for blur and matrix, to their stopping tolerance)."""
    make, shape = OPERATORS[name]
    op = make()
    gen = torch.Generator().manual_seed(2)
    x_true = 2 * torch.rand(3, *shape, dtype=torch.float64, generator=gen) - 1
    x = 3 * torch.randn(3, *shape, dtype=torch.float64, generator=gen)
    y = op(x_true)
    z = op.project_box(x, y, -1.0, 1.0)
    assert z.shape == x.shape and z.abs().max() <= 1
    torch.testing.assert_close(op.project(z, y), z, rtol=0, atol=1e-3)  # on the measured set
    a = _dense(op, shape)
    kept = torch.linalg.pinv(a, rtol=op.cutoff if name == "blur" else 1e-10) @ a  # the projector A^+ A
    values, vectors = torch.linalg.eigh(kept)
    rows = vectors[:, values > 0.5].T  # an orthonormal basis of A's (kept) row space
    atol = 1e-6 if name in ("mask", "colorize", "downsample") else 2e-3
    for i in range(3):
        target = rows @ (kept @ x_true[i].flatten())
        nearest = _nearest_in_box(rows, x[i].flatten(), target)
        np.testing.assert_allclose(z[i].flatten().numpy(), nearest, rtol=0, atol=atol)
    if name in ("colorize", "downsample", "matrix"):  # with a null space, projecting then clipping leaves the set
        assert (op(op.project(x, y).clamp(-1, 1)) - y).abs().max() > 0.1


def test_project_box_at_the_top_of_the_range_gives_the_corner():
    """A white pixel's luma may round above the box's top in float32 (and a noisy y can lie outside A's image of
    the box): project_box_rows then returns the nearest corner, finite, in the box."""
    white = torch.ones(2, 3, 2, 2)
    y = Colorize()(white) + 1e-3
    z = Colorize().project_box(torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)), y, -1.0, 1.0)
    assert torch.equal(z, white)


@pytest.mark.parametrize("name", ["colorize", "downsample", "mask"])
def test_solve_with_a_box_ends_in_it_on_the_measurement(name):
    """solve(..., box=(-1, 1)) on N(0, I) data (outside the box often): the projecting methods end in the box with
    A x = y (so clipping to the pixels keeps the measurement); a mask's result is the unboxed one clipped (the same
    bytes once the kind clips); DPS, which does not project, ignores the box."""
    make, shape = OPERATORS[name]
    op = make()
    x_true = SampleGenerators(3, range(6)).rand((6, *shape), dtype=torch.float64) * 2 - 1
    y = op(x_true)

    def run(method, box, **options):
        return solve("pc", "score", gaussian_score(VP), VP, op, y, (6, *shape), SampleGenerators(5, range(6)), 6,
                     BASE, method, box=box, **options).x

    for method, options in (("replace", {}), ("mcg", dict(alpha=0.1))):
        free, boxed = run(method, None, **options), run(method, (-1.0, 1.0), **options)
        assert free.abs().max() > 1.2 and boxed.abs().max() <= 1
        torch.testing.assert_close(op(boxed), y, rtol=0, atol=1e-6)
        if name == "mask":
            assert torch.equal(boxed, free.clamp(-1, 1))
        else:
            assert (op(free.clamp(-1, 1)) - y).abs().max() > 0.05
    assert torch.equal(run("dps", (-1.0, 1.0), zeta=0.5), run("dps", None, zeta=0.5))


# --------------------------------------------------------------------------- the exact posterior


def test_the_gmm_posterior_is_prior_times_likelihood_over_the_evidence():
    """With noise: the posterior's CDF along a direction equals the numerical integral of p(x) N(y; M x, s^2) on a
    grid; without noise and M a coordinate selector it is gmm_conditional."""
    g = GaussianMixture.from_params(**MIX)
    m = torch.tensor(SUM, dtype=torch.float64)
    v = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    u = torch.linspace(-15, 15, 3001, dtype=torch.float64)
    for y_value, noise in ((0.5, 0.5), (-2.0, 1.0)):
        # x = a w + u v with w = (1, 1)/sqrt 2: integrate the joint over a at each u
        a = torch.linspace(-15, 15, 601, dtype=torch.float64)
        w = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
        pts = a[:, None, None] * w + u[None, :, None] * v  # (A, U, 2)
        joint = g.log_prob(pts.reshape(-1, 2)).exp().reshape(len(a), len(u))
        lik = torch.exp(-0.5 * ((pts @ m.T)[..., 0] - y_value) ** 2 / noise ** 2)
        density_u = torch.trapezoid(joint * lik, a, dim=0)
        numeric = torch.cumulative_trapezoid(density_u, u) / torch.trapezoid(density_u, u)
        xs = u[1:, None] * v
        y = torch.full((len(xs), 1), y_value, dtype=torch.float64)
        cdf = gmm_posterior_cdf(g, m, y, noise, xs, v)
        torch.testing.assert_close(cdf, numeric, atol=2e-4, rtol=0)
    selector = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x = g.sample(7, torch.Generator().manual_seed(0))
    w_post, means, covs = gmm_posterior(g, selector, x[:, :1], 0.0)
    w_cond, means_cond, covs_cond = gmm_conditional(g, x, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(w_post, w_cond)
    torch.testing.assert_close(means[..., 1:], means_cond)
    torch.testing.assert_close(covs[:, 1:, 1:], covs_cond)


N_KS = 2000
KS_95 = float(stats.kstwo.ppf(0.95, N_KS))  # 0.030: exact draws exceed it one time in 20


def _ks(method, noise, n=N_KS, steps=500, options=None, **method_options):
    """KS of the PIT of solve's x along A's null space under the exact posterior, A = [[1, 1]], exact mixture score."""
    g = GaussianMixture.from_params(**MIX)
    op = Matrix(SUM)
    x_true = g.sample(n, torch.Generator().manual_seed(1))
    y = measure(op, x_true, noise, torch.Generator().manual_seed(2))
    out = solve("pc", "score", exact_score_fn(g, VP), VP, op, y, (n, 2), torch.Generator().manual_seed(0), steps,
                {**BASE, **(options or {})}, method, noise=noise, **method_options)
    pit = gmm_posterior_cdf(g, op.matrix, y, noise, out.x, op.null_direction())
    ks = float(stats.kstest(pit.numpy(), "uniform").statistic)
    consistency = float((op(out.x) - y).abs().mean())
    print(f"\n{method} noise {noise} {method_options}: KS = {ks:.4f} (n = {n}, 5 % critical {KS_95:.4f}); "
          f"mean |A x - y| = {consistency:.4f}; nfe {out.nfe}")
    return ks, consistency


def test_the_ks_statistic_sees_a_wrong_posterior():
    """Draws of the true posterior pass; the prior's own draws (ignoring y) fail by far."""
    g = GaussianMixture.from_params(**MIX)
    op = Matrix(SUM)
    x = g.sample(N_KS, torch.Generator().manual_seed(1))
    v = op.null_direction()
    for noise in (0.0, 0.5):
        y = measure(op, x, noise, torch.Generator().manual_seed(2))
        if noise == 0:
            truth = x  # noiseless: x itself is a draw of p(x | A x)
        else:  # a fresh draw of p(x | y) from the closed form
            weights, means, covs = gmm_posterior(g, op.matrix, y, noise)
            k = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(3))[:, 0]
            chol = torch.linalg.cholesky(covs)[k]
            z = torch.randn(N_KS, 2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            truth = means[torch.arange(N_KS), k] + (chol @ z)[..., 0]
        prior = g.sample(N_KS, torch.Generator().manual_seed(5))
        ks_truth = stats.kstest(gmm_posterior_cdf(g, op.matrix, y, noise, truth, v).numpy(), "uniform").statistic
        ks_prior = stats.kstest(gmm_posterior_cdf(g, op.matrix, y, noise, prior, v).numpy(), "uniform").statistic
        assert ks_truth < KS_95 and ks_prior > 3 * KS_95, (noise, ks_truth, ks_prior)


def test_noiseless_the_best_method_recovers_the_exact_posterior_of_a_matrix_measurement():
    """The issue's bar: A = [[1, 1]], noiseless, n = 2,000, the best method's KS <= 0.05; replace after the PC
    sampler's Langevin corrector (the inpainting oracle's exact setting) meets it, and ends on A x = y."""
    ks, consistency = _ks("replace", 0.0, options=dict(corrector="langevin"))
    assert ks <= 0.05 and consistency < 1e-12


def test_noisy_dps_and_mcg_are_reported_and_dps_is_consistent_to_the_noise():
    """sigma_y = 0.5: DPS and MCG's KS are reported (both approximate, Chung et al. 2023 sec. 3); DPS leaves
    |A x - y| at the noise's scale, MCG's projection puts it at 0 (it fits the noise)."""
    ks_dps, c_dps = _ks("dps", 0.5, steps=250, zeta=0.05)
    ks_mcg, c_mcg = _ks("mcg", 0.5, steps=250, alpha=0.01)
    assert 0 <= ks_dps <= 1 and 0 <= ks_mcg <= 1
    assert c_mcg < 1e-12 and 0.05 < c_dps < 1.0  # E|A x - y| = 0.5 sqrt(2 / pi) = 0.4 for exact posterior draws


def test_colourfulness_by_hand():
    """Hasler & Süsstrunk's M: 0 for grey; a flat pure red image has rg = 255, yb = 127.5, no spread, so
    M = 0.3 sqrt(255^2 + 127.5^2); half red, half green pixels add the spread of rg (255 and -255: sd 255)."""
    from pipeline.metrics.images import colourfulness

    grey = np.full((2, 3, 4, 4), 77, np.uint8)
    red = np.zeros((1, 3, 4, 4), np.uint8)
    red[:, 0] = 255
    split = np.zeros((1, 3, 2, 2), np.uint8)
    split[0, 0, 0], split[0, 1, 1] = 255, 255  # top row red, bottom row green: rg = +-255, yb = 127.5
    found = colourfulness(np.concatenate([grey, red]))
    assert found[:2].tolist() == [0.0, 0.0] and found[2] == pytest.approx(0.3 * math.hypot(255, 127.5))
    assert colourfulness(split)[0] == pytest.approx(255 + 0.3 * 127.5)
    with pytest.raises(ValueError, match="RGB"):
        colourfulness(grey[:, :1])


def test_a_per_item_mask_gives_each_batch_its_rows_and_describes_its_kind():
    """Mask.rows: a per-item mask (n, *D) is cut to the batch's rows, a shared one (*D) is kept; the arrays and
    description samples.npz records."""
    mask = (torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    op = Mask(mask, (6, 1, 4, 4), "random")
    part = op.rows(slice(2, 5))
    assert torch.equal(part.mask, mask[2:5]) and part.kind == "random"
    shared = Mask(mask[0], (6, 1, 4, 4))
    assert shared.rows(slice(2, 5)) is shared and Colorize().rows(slice(0, 1)).arrays() == {}
    assert op.describe()["mask"] == "random" and (op.arrays()["mask"] == mask.numpy().astype(np.uint8)).all()
