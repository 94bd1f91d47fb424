"""Exact log-likelihoods from the probability-flow ODE, and the divergence estimators they need.

log p_0(x(0)) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt with f~ the probability-flow drift
(Song et al. 2021, arXiv:2011.13456, eq. (39), appendix D.2; instantaneous change of variables,
Chen et al. 2018, arXiv:1806.07366, Theorem 1). Divergences come exactly from autograd (low D) or
from Hutchinson's estimator eps^T (d f~/dx) eps (Grathwohl et al. 2019, arXiv:1810.01367).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from pipeline.parameterization import ScoreFn
from pipeline.processes import Process
from pipeline.samplers.ode import ode_field

VectorField = Callable[[Tensor, Tensor], Tensor]
DIVERGENCES = ("exact", "rademacher", "gaussian")


def _value_and_divergence(fn: VectorField, x: Tensor, t: Tensor, probe: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(fn(x, t) shaped like x, its divergence (B,)): exact if probe is None, else Hutchinson with the probe.

    Both values come detached: they feed an ODE solver, not an optimiser.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x, t)
        if probe is not None:
            # one vector-Jacobian product eps^T J, then the dot with eps: eps^T J eps, E = tr J
            (vjp,) = torch.autograd.grad(out, x, grad_outputs=probe.to(out.dtype))
            return out.detach(), (vjp * probe).flatten(1).sum(1).detach()
        flat = out.flatten(1)
        div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
        for i in range(flat.shape[1]):
            # examples are independent, so d(sum_b f_i(x_b))/dx_b is row i of example b's Jacobian
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
            div = div + grad.flatten(1)[:, i]
        return out.detach(), div.detach()


def divergence_exact(fn: VectorField, x: Tensor, t: Tensor) -> Tensor:
    """Exact divergence sum_i d fn_i / d x_i of fn(x, t) by autograd, one backward pass per dimension.

    x: (B, *D), t: (B,); returns (B,). Costs prod(D) backward passes: for low dimension only.
    Assumes examples do not interact through fn (no batch norm in training mode).
    """
    return _value_and_divergence(fn, x, t, None)[1]


def divergence_hutchinson(fn: VectorField, x: Tensor, t: Tensor, probe: Tensor) -> Tensor:
    """Hutchinson's estimate eps^T (d fn/dx) eps of the divergence of fn(x, t), one vector-Jacobian product.

    x and probe: (B, *D), t: (B,); returns (B,). Unbiased for E[eps eps^T] = I, e.g. Rademacher or
    standard Gaussian probes (Hutchinson 1989; Grathwohl et al. 2019, arXiv:1810.01367, sec. 3).
    """
    return _value_and_divergence(fn, x, t, probe)[1]


def _draw_probe(kind: str, shape: tuple[int, ...], generator: Optional[torch.Generator],
                device: torch.device = torch.device("cpu")) -> Optional[Tensor]:
    """A fixed float64 probe shaped like x for Hutchinson (drawn on the CPU, then moved to `device`),
    or None for the exact divergence."""
    if kind == "exact":
        return None
    if kind == "rademacher":
        return (torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1).to(device)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")


def ode_log_likelihood(
    process: Process,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    divergence: str = "exact",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    offset: float = 0.0,
    field: str = "score",
) -> dict:
    """log p(x) per example from the probability-flow ODE, plus nll (nats/dim) and bits/dim.

    Integrates x and delta(t) = int_{t_eps}^t div f~ ds jointly from t_eps to T with SciPy's RK45,
    the batch as one flat float64 state, then log p(x) = log p_T(x(T)) + delta(T) (Song et al. 2021,
    arXiv:2011.13456, eq. (39) and appendix D.2, rtol = atol = 1e-5, t_eps = 1e-5 there).

    x: (B, *D) data, read as a sample at time t_eps (default process.t_min): what is computed is
    log p_{t_eps}(x), which differs from log p_0(x) by the little noise at t_eps. score_fn gets
    float64 inputs, so a float32 network needs its own cast (e.g. `net.double()`).
    divergence: "exact" (D backward passes per evaluation), or Hutchinson with ONE probe per
    example fixed for the whole trajectory, "rademacher" or "gaussian", drawn from `generator`
    (the global RNG if None); the integral is then unbiased for each example.
    offset: added to bpd, e.g. 8 for 8-bit data scaled to [0, 1] and uniformly dequantised (the
    density of the discrete data is p(x) / 256^D), 7 for [-1, 1]; 0 for continuous data.
    field "velocity": score_fn is a flow-matching velocity, the ODE's right-hand side itself (the instantaneous
    change of variables holds for any flow; Lipman et al. 2023, sec. 5 measure bits/dim this way).

    The ODE state lives on the CPU (SciPy); each evaluation of score_fn runs on x's device.

    Returns {"logp": (B,) float64 on the CPU, "nll": mean_b(-logp_b) / D, "bpd": nll / ln 2 + offset,
    "nfe": number of drift evaluations}.
    """
    from scipy import integrate  # here: half a second at every evaluate start that computes no likelihood

    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    t0 = process.t_min if t_eps is None else float(t_eps)
    device = x.device
    x64 = x.detach().to("cpu", torch.float64)
    shape, batch = tuple(x64.shape), x64.shape[0]
    dim = x64[0].numel()
    n_x = batch * dim
    probe = _draw_probe(divergence, shape, generator, device)
    drift = ode_field(process, score_fn, field)
    nfe = 0

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[:n_x]).reshape(shape).to(device)
        tt = torch.full((batch,), t, dtype=torch.float64, device=device)
        d, div = _value_and_divergence(drift, xt, tt, probe)
        return np.concatenate([d.reshape(-1).to("cpu", torch.float64).numpy(), div.to("cpu", torch.float64).numpy()])

    y0 = np.concatenate([x64.reshape(-1).numpy(), np.zeros(batch)])
    sol = integrate.solve_ivp(rhs, (t0, process.t_max), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
    x_T = torch.from_numpy(sol.y[:n_x, -1]).reshape(shape)
    delta = torch.from_numpy(sol.y[n_x:, -1])
    logp = process.prior_logp(x_T).to(torch.float64) + delta
    nll = float(-logp.mean()) / dim
    return {"logp": logp, "nll": nll, "bpd": nll / math.log(2) + offset, "nfe": nfe}


def model_likelihoods(model_kind: str, fn: Callable, process: Process, x: Tensor, *, ode: bool, elbo: Optional[str],
                      divergence: str = "auto", rtol: float = 1e-5, atol: float = 1e-5, elbo_slices: int = 20,
                      elbo_variance: str = "beta", generator: Optional[torch.Generator] = None,
                      scaling: Optional[str] = None) -> dict[str, float]:
    """Every likelihood a model has on held-out x (B, *D), per dimension, with standard errors over the points.

    ode: `nll` / `bpd` from the probability-flow ODE (score models on continuous processes; divergence
    'auto' is exact up to D = 16, Rademacher Hutchinson above), integrated from process.t_min, where
    the model was trained (1e-3 for VP / sub-VP; Song et al. 2021 start at 1e-5): the density of x
    read at t_min, i.e. smoothed by std(t_min) (0.01 for VP). elbo "discrete": the full bound of
    pipeline.elbo (DDPM with a fixed `elbo_variance`, or Sohl-Dickstein's learned kernel); "huang":
    Huang et al.'s continuous ELBO with `elbo_slices` random times per point, uniform and, where the
    process defines it, importance-sampled (the `_importance` keys). fn is a score_fn, a kernel_fn
    when model_kind == "kernel", or a flow-matching velocity_fn (model_kind "velocity": the ODE only). Values in
    nats/dim; `elbo_bpd` = elbo_nll / ln 2 (no dequantisation offset, except for "huang" on pixels, below).

    scaling None: x is continuous data, used as it is. scaling "minus_one_one" or "zero_one"
    (pipeline.pixels): x is 8-bit pixels (uint8 or integer-valued, (N, C, H, W)). The ODE then runs
    on the uniformly dequantised model-space data, drawn from `generator` before any probe, and
    `bpd` = nll / ln 2 + bpd_offset(scaling) (score_sde); `nll` stays nats/dim of that continuous
    data. "discrete" uses the discretised Gaussian decoder (Ho et al. 2020, eq. (13)) on the plain
    model-space pixels: elbo_nll bounds -log P(x) / D of the discrete pixels, elbo_bpd = elbo_nll / ln 2.
    "huang" bounds the density of the same dequantised data as the ODE, so elbo_bpd adds the offset.
    """
    from pipeline.elbo import negative_elbo
    from pipeline.losses import HuangELBO
    from pipeline.parameterization import kernel_from_score
    from pipeline.pixels import bpd_offset, discrete_decoder, to_model

    dim, n = x[0].numel(), x.shape[0]
    out: dict[str, float] = {}
    offset = 0.0 if scaling is None else bpd_offset(scaling)  # refuses an unknown scaling before any work
    run_ode = ode and model_kind in ("score", "velocity")
    # one dequantised draw, the generator's first, shared by the ODE and Huang's bound (paired estimates)
    # model-space pixels in float64, the precision the likelihoods run in (evaluate loads the network in float64)
    x_dq = x if scaling is None or not (run_ode or elbo == "huang") else to_model(
        x, scaling, dequantize=True, generator=generator).to(torch.float64)
    if run_ode:
        div = divergence if divergence != "auto" else ("exact" if dim <= 16 else "rademacher")
        r = ode_log_likelihood(process, fn, x_dq, divergence=div, rtol=rtol, atol=atol, generator=generator,
                               offset=offset, field=model_kind)
        out.update(nll=r["nll"], nll_se=float(r["logp"].std()) / math.sqrt(n) / dim, bpd=r["bpd"],
                   likelihood_nfe=r["nfe"])
    if elbo == "discrete":
        kernel = fn if model_kind == "kernel" else kernel_from_score(fn, process, elbo_variance)
        decoder = {} if scaling is None else discrete_decoder(scaling)
        x_elbo = x if scaling is None else to_model(x, scaling).to(torch.float64)
        with torch.no_grad():
            values = negative_elbo(kernel, process, x_elbo, generator, **decoder)
        out.update(elbo_nll=float(values.mean()) / dim, elbo_nll_se=float(values.std()) / math.sqrt(n) / dim)
    elif elbo == "huang":
        samplings = ["uniform", "importance"] if process.has_importance_sampling else ["uniform"]
        for sampling in samplings:
            estimator = HuangELBO(process, "score", t_sampling=sampling)
            with torch.no_grad():  # of_score turns gradients on for its divergence only
                draws = torch.stack([estimator.of_score(fn, x_dq, generator) for _ in range(elbo_slices)])
            key = "elbo_nll" if sampling == "uniform" else "elbo_nll_importance"
            out[key] = float(draws.mean()) / dim
            out[key + "_se"] = float(draws.std()) / math.sqrt(draws.numel()) / dim
    if "elbo_nll" in out:
        out["elbo_bpd"] = out["elbo_nll"] / math.log(2) + (offset if elbo == "huang" else 0.0)
    return out
