"""Training losses: small callables loss(model, x, cond=None, generator=None) -> per-example loss (B,).

cond: the int64 label indices (B,) of a class-conditional network (pipeline.guidance: 0 the null label, after
label dropout), given to the network as model(x, c, cond); None for an unconditional one. It draws no randomness,
so a loss consumes the generator the same way with and without labels.

Each loss draws one time per example (from process.sample_time, or importance-sampled), a noise
z and x_t = process.perturb(x, t, z), asks the network for the score at (x_t, t) through
pipeline.parameterization, and returns one number per example; x is (B, D) or (B, C, H, W).
The caller reduces (mean) and applies any further weighting. Randomness is drawn in a fixed
order (t, z, then probes) from `generator`, so the same seed gives the same bits, and losses
built with the same process share t and z at the same seed (common random numbers).

Score-matching losses (dsm, ism, ssm) weight time by lambda(t): "sigma2", lambda = std(t)^2
(Song & Ermon 2019, arXiv:1907.05600, sec. 4.2), or "likelihood", lambda = g(t)^2
(Song et al. 2021, arXiv:2101.09258, Theorem 1). With the same lambda, DSM and ISM
differ by lambda D / (2 std^2) in expectation for any network (Vincent 2011; Stein's lemma),
and SSM equals ISM in expectation over its probes.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline import rng
from pipeline.coupling import couple
from pipeline.elbo import DiscreteELBO
from pipeline.names import COUPLINGS
from pipeline.parameterization import PARAMETERIZATIONS, bind_labels, eps_from_score, make_score_fn, x0_from_score
from pipeline.processes import Process, append_dims

WEIGHTINGS = ("sigma2", "likelihood")
T_SAMPLINGS = ("uniform", "importance")
PROBES = ("gaussian", "rademacher")
REDUCTIONS = ("sum", "mean")


def _choice(option: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _count(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def _sq(v: Tensor) -> Tensor:
    """||v||^2 over all but the batch dimension, (B,)."""
    return v.pow(2).flatten(1).sum(1)


def _probe(x: Tensor, kind: str, generator: Optional[torch.Generator]) -> Tensor:
    """A probe v shaped like x with E[v v^T] = I: standard normal or Rademacher."""
    if kind == "gaussian":
        return rng.randn_like(x, generator)
    return (torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1).to(x.device)


def _vjv(score: Tensor, x: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    """v^T (d score / d x) v per example, (B,), by one backward pass.

    Per-example values come from one backward of a batch sum, which assumes the network treats
    examples independently (no batch norm); retain_graph because callers take several passes.
    """
    if not score.requires_grad:  # the score does not depend on x: its Jacobian is zero
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    (jtv,) = torch.autograd.grad((score * v).sum(), x, create_graph=create_graph, retain_graph=True,
                                 allow_unused=True)
    if jtv is None:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return (jtv * v).flatten(1).sum(1)


def _exact_divergence(score: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """tr(d score / d x) per example, (B,), by one backward pass per dimension."""
    flat = score.flatten(1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, i] = 1
        div = div + _vjv(score, x, e.reshape(score.shape), create_graph)
    return div


class _PerturbedLoss:
    """What every loss here shares: option checks, time sampling, perturbation, the score at x_t.

    `integral`: the loss estimates a time integral over [t_min, t_max] (Huang's ELBO), so t_sampling "uniform"
    means uniform there even where the process trains on other times (EDM's log-normal σ)."""

    integral = False

    def __init__(self, process: Process, parameterization: str, weighting: str = "sigma2",
                 t_sampling: str = "uniform"):
        _choice("parameterization", parameterization, PARAMETERIZATIONS)
        _choice("weighting", weighting, WEIGHTINGS)
        _choice("t_sampling", t_sampling, T_SAMPLINGS)
        self.process, self.parameterization = process, parameterization
        self.weighting, self.t_sampling = weighting, t_sampling
        # Fail at construction, not at the first training step, when the process lacks what is asked.
        if weighting == "likelihood" and not process.has_sde:
            raise ValueError(f"weighting='likelihood' needs the diffusion g(t) of process.sde, which "
                             f"{type(process).__name__} does not have ({process.why_not('has_sde')}); "
                             f"use weighting='sigma2'")
        if t_sampling == "importance" and not process.has_importance_sampling:
            raise ValueError(f"t_sampling='importance' needs process.sample_time_importance, which "
                             f"{type(process).__name__} does not have ({process.why_not('has_importance_sampling')}); "
                             f"use t_sampling='uniform'")

    def _perturbed(self, x: Tensor, generator: Optional[torch.Generator]
                   ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(t (B,), z like x, x_t like x, time weight (B,) or None for uniform time)."""
        p = self.process
        weight = None
        if self.t_sampling == "uniform":
            draw = p.uniform_time if self.integral else p.sample_time
            t = draw(x.shape[0], generator).to(device=x.device, dtype=x.dtype)
        else:
            t, inv_q = p.sample_time_importance(x.shape[0], generator)
            t, inv_q = t.to(device=x.device, dtype=x.dtype), inv_q.to(device=x.device, dtype=x.dtype)
            # The proposal may put mass below t_min (VP holds it flat on [0, t_min]); those draws get
            # weight 0 so both samplings estimate the same time average over [t_min, t_max]: with the
            # 1/(t_max - t_min) of the uniform density, switching t_sampling changes the variance,
            # not the objective. Keeping them would also diverge: the likelihood-weighted DSM integrand
            # grows like 1/t, and its integral from 0 does not exist.
            weight = torch.where(t >= p.t_min, inv_q / (p.t_max - p.t_min), torch.zeros_like(inv_q))
            t = t.clamp(min=p.t_min)  # the zero-weight draws never evaluate std = 0
        z = rng.randn_like(x, generator)
        return t, z, p.perturb(x, t, z), weight

    def _score(self, model: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
        return make_score_fn(model, self.process, self.parameterization)(x_t, t)

    def _lambda(self, x: Tensor, t: Tensor) -> Tensor:
        """The time weighting lambda(t), (B,)."""
        if self.weighting == "sigma2":
            return self.process.marginal(t)[1] ** 2
        return self.process.sde(x, t)[1] ** 2

    @staticmethod
    def _time_weighted(loss: Tensor, weight: Optional[Tensor]) -> Tensor:
        return loss if weight is None else loss * weight


class DenoisingScoreMatching(_PerturbedLoss):
    """Denoising score matching, one random time per example: 1/2 lambda ||s(x_t, t) + z / std||^2, (B,).

    Summed over dimensions. lambda = std^2 ("sigma2", the default) is NCSN's objective (Song &
    Ermon 2019, arXiv:1907.05600, sec. 4.2), = 1/2 ||std s + z||^2; lambda = g^2 ("likelihood")
    is the weighting of Song et al. 2021 (arXiv:2101.09258) whose time integral bounds the KL
    divergence to the data, hence the negative log-likelihood (their Theorem 1).
    t_sampling="importance" draws t from process.sample_time_importance and multiplies by its
    weights, normalised so the expectation is the uniform-time one (see _PerturbedLoss._perturbed).
    """

    def __init__(self, process: Process, parameterization: str, weighting: str = "sigma2",
                 t_sampling: str = "uniform"):
        super().__init__(process, parameterization, weighting, t_sampling)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t, z, x_t, weight = self._perturbed(x, generator)
        score = self._score(bind_labels(model, cond), x_t, t)
        _, std = self.process.marginal(t)
        residual = append_dims(std, x.ndim).to(x.dtype) * score + z
        loss = 0.5 * _sq(residual)
        if self.weighting != "sigma2":  # the residual already carries std^2; rescale to lambda
            loss = loss * self._lambda(x, t) / std**2
        return self._time_weighted(loss, weight)


class EpsilonMSE(_PerturbedLoss):
    """Ho et al. 2020's L_simple (arXiv:2006.11239, eq. (14)): ||eps_hat(x_t, t) - z||^2, (B,).

    eps_hat = -std s comes from the score (parameterization.eps_from_score), so any network
    output works. reduction="sum" (default) sums over dimensions, which makes the loss exactly
    twice the sigma2-weighted DSM at the same seed; "mean" averages over dimensions, as Ho et
    al.'s code does, so the scale does not grow with the image size.
    """

    def __init__(self, process: Process, parameterization: str, reduction: str = "sum",
                 t_sampling: str = "uniform"):
        _choice("reduction", reduction, REDUCTIONS)
        super().__init__(process, parameterization, "sigma2", t_sampling)
        self.reduction = reduction

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t, z, x_t, weight = self._perturbed(x, generator)
        eps_hat = eps_from_score(self._score(bind_labels(model, cond), x_t, t), t, self.process)
        err = (eps_hat - z).pow(2).flatten(1)
        return self._time_weighted(err.sum(1) if self.reduction == "sum" else err.mean(1), weight)


class EDMLoss(_PerturbedLoss):
    """EDM's training loss (Karras et al. 2022, arXiv:2206.00364, eq. 8 and Table 1): λ(σ) ||D(x_σ; σ) − x||², (B,).

    σ from process.sample_time (EDM's log-normal), λ(σ) = (σ² + σ_d²) / (σ σ_d)², which gives the preconditioned
    network F a target of unit variance at every σ (their sec. 5); D is Tweedie's x0_hat from the score, so any
    parameterization trains, and σ = std / m makes it defined on every process (in EDM's own, m = 1, std = σ).
    Summed over dimensions, as EDM's code sums over elements. Equals 2 (σ² + σ_d²) / σ_d² times the σ²-weighted DSM.
    """

    def __init__(self, process: Process, parameterization: str, sigma_data: float = 0.5):
        if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a number > 0, got {sigma_data!r}")
        super().__init__(process, parameterization)
        self.sigma_data = float(sigma_data)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t, _, x_t, _ = self._perturbed(x, generator)
        score = self._score(bind_labels(model, cond), x_t, t)
        m, std = self.process.marginal(t)
        d = x0_from_score(x_t, score, t, self.process)
        sigma = std / m
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return weight * _sq(d - x)


class _DivergenceLoss(_PerturbedLoss):
    """Shared driver of ISM and SSM: the score at a perturbed x_t kept differentiable in x_t."""

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t, _, x_t, weight = self._perturbed(x, generator)
        # create_graph so the divergence term trains the model; under no_grad (evaluation) the
        # double-backward graph is not built and the result is detached.
        train = torch.is_grad_enabled()
        with torch.enable_grad():
            x_t = x_t if x_t.requires_grad else x_t.requires_grad_()
            score = self._score(bind_labels(model, cond), x_t, t)
            loss = self._lambda(x, t) * self._objective(score, x_t, generator, train)
        return self._time_weighted(loss if train else loss.detach(), weight)

    def _objective(self, score: Tensor, x_t: Tensor, generator: Optional[torch.Generator],
                   create_graph: bool) -> Tensor:
        raise NotImplementedError


class ImplicitScoreMatching(_DivergenceLoss):
    """Hyvärinen 2005 (JMLR 6, Theorem 1) on the perturbed data: lambda (1/2 ||s(x_t)||^2 + div s(x_t)), (B,).

    The divergence is exact (one backward per dimension) when D <= exact_max_dim, else
    Hutchinson's estimate with n_probes Rademacher probes, unbiased. With the same lambda it
    equals DSM minus lambda D / (2 std^2) in expectation, so the two are comparable.
    """

    def __init__(self, process: Process, parameterization: str, weighting: str = "sigma2",
                 t_sampling: str = "uniform", exact_max_dim: int = 16, n_probes: int = 1):
        _count("exact_max_dim", exact_max_dim, 0)
        _count("n_probes", n_probes, 1)
        super().__init__(process, parameterization, weighting, t_sampling)
        self.exact_max_dim, self.n_probes = exact_max_dim, n_probes

    def _objective(self, score, x_t, generator, create_graph):
        if x_t[0].numel() <= self.exact_max_dim:
            div = _exact_divergence(score, x_t, create_graph)
        else:
            div = sum(_vjv(score, x_t, _probe(x_t, "rademacher", generator), create_graph)
                      for _ in range(self.n_probes)) / self.n_probes
        return 0.5 * _sq(score) + div


class SlicedScoreMatching(_DivergenceLoss):
    """Sliced score matching (Song et al. 2019, arXiv:1905.07088, sec. 3) on the perturbed data, (B,).

    lambda mean_v [v^T (ds/dx) v + 1/2 (v^T s)^2] over n_projections probes v (gaussian or
    rademacher); variance_reduced=True is their SSM-VR, 1/2 ||s||^2 in place of
    1/2 (v^T s)^2. Either equals ISM in expectation over v.
    """

    def __init__(self, process: Process, parameterization: str, weighting: str = "sigma2",
                 t_sampling: str = "uniform", n_projections: int = 1, probe: str = "gaussian",
                 variance_reduced: bool = False):
        _count("n_projections", n_projections, 1)
        _choice("probe", probe, PROBES)
        if not isinstance(variance_reduced, bool):
            raise ValueError(f"variance_reduced must be True or False, got {variance_reduced!r}")
        super().__init__(process, parameterization, weighting, t_sampling)
        self.n_projections, self.probe, self.variance_reduced = n_projections, probe, variance_reduced

    def _objective(self, score, x_t, generator, create_graph):
        total = torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        for _ in range(self.n_projections):
            v = _probe(x_t, self.probe, generator)
            total = total + _vjv(score, x_t, v, create_graph)
            if not self.variance_reduced:
                total = total + 0.5 * (v * score).flatten(1).sum(1) ** 2
        total = total / self.n_projections
        return total + 0.5 * _sq(score) if self.variance_reduced else total


class HuangELBO(_PerturbedLoss):
    """The negative continuous-time ELBO of Huang et al. 2021 (arXiv:2106.02808, Theorem 3), (B,) in nats.

    -ELBO(x) = -log p_T(y_T) + int_{t_min}^{T} [div mu(y_t, t) + 1/2 ||a(y_t, t)||^2] dt with the
    network's drift a = g s (whatever its parameterization), mu = g a - f, y_t ~ q(y_t | x), estimated
    with one time slice per example (uniform, or importance-sampled as in their sec. 5) and the
    divergence exact (D <= exact_max_dim) or by one Rademacher probe (sdeflow-light). With the true
    score the bound is tight up to the prior mismatch at T, so E[-loss] is log p(x).
    """

    integral = True

    def __init__(self, process: Process, parameterization: str, t_sampling: str = "uniform",
                 exact_max_dim: int = 16):
        _count("exact_max_dim", exact_max_dim, 0)
        super().__init__(process, parameterization, "sigma2", t_sampling)
        if not process.has_sde:
            raise ValueError(f"the Huang ELBO needs a continuous process with an SDE; {type(process).__name__} "
                             f"has none ({process.why_not('has_sde')})")
        self.exact_max_dim = exact_max_dim

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        return self.of_score(make_score_fn(bind_labels(model, cond), self.process, self.parameterization), x, generator)

    def of_score(self, score_fn, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The same one-slice estimate for any score_fn(x, t) (a trained network or an exact score), (B,)."""
        p = self.process
        t, _, y_t, weight = self._perturbed(x, generator)
        t_max = torch.full_like(t, p.t_max)
        y_max = p.perturb(x, t_max, rng.randn_like(x, generator))
        train = torch.is_grad_enabled()
        with torch.enable_grad():
            y_t = y_t if y_t.requires_grad else y_t.requires_grad_()
            score = score_fn(y_t, t)
            f, g = p.sde(y_t, t)
            g2 = append_dims(g, x.ndim).to(x.dtype) ** 2
            mu = g2 * score - f  # g a - f with a = g s
            if x[0].numel() <= self.exact_max_dim:
                div = _exact_divergence(mu, y_t, train)
            else:
                div = _vjv(mu, y_t, _probe(y_t, "rademacher", generator), train)
            integrand = div + 0.5 * g**2 * _sq(score)
        span = (p.t_max - p.t_min) * (1.0 if weight is None else weight)
        loss = -p.prior_logp(y_max) + span * integrand
        return loss if train else loss.detach()


class FlowMatchingLoss:
    """Conditional flow matching: ||v(x_t, t) − (m' x0 + std' z)||² summed over dimensions, (B,).

    Lipman et al. 2023 (arXiv:2210.02747, eq. 23): the regression of the network's velocity on the conditional
    velocity of the path x_t = m x0 + std z (pipeline.processes.LinearPath: −x0 + (1 − σ_min) z), whose minimiser is
    the marginal velocity (their Theorem 2). t uniform on [t_min, t_max] (process.sample_time), z ~ N(0, I) from
    `generator`, then paired with x by `coupling` (pipeline.coupling: independent, or Tong et al. 2023's minibatch
    OT). The network outputs the velocity; labels (cond) are passed on to it.
    """

    def __init__(self, process: Process, parameterization: str = "velocity", coupling: str = "independent"):
        _choice("parameterization", parameterization, ("velocity",))
        _choice("coupling", coupling, COUPLINGS)
        self.process, self.parameterization, self.coupling = process, parameterization, coupling

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t = self.process.sample_time(x.shape[0], generator).to(device=x.device, dtype=x.dtype)
        return self._regress(model, x, couple(x, rng.randn_like(x, generator), self.coupling), t, cond)

    def _regress(self, model: nn.Module, x0: Tensor, z: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        """||v(x_t, t) − (m' x0 + std' z)||² per example for the pairs (x0, z) at times t (B,)."""
        p = self.process
        dm, ds = p.marginal_rates(t)
        target = append_dims(dm, x0.ndim).to(x0.dtype) * x0 + append_dims(ds, x0.ndim).to(x0.dtype) * z
        v = bind_labels(model, cond)(p.perturb(x0, t, z), p.conditioning(t).to(x0.dtype))
        return _sq(v - target)


class ReflowLoss(FlowMatchingLoss):
    """Flow matching on given pairs: x (B, 2, *D) stacks (x0, z), a sample of the previous flow and the noise it
    started from, so the new flow's paths are straight between them (Liu et al. 2023, arXiv:2209.03003, sec. 2.2,
    "reflow"). t uniform from `generator`; no coupling: the pairs are the coupling."""

    def __init__(self, process: Process, parameterization: str = "velocity"):
        super().__init__(process, parameterization, "independent")

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        if x.ndim < 3 or x.shape[1] != 2:
            raise ValueError(f"reflow trains on pairs stacked as (B, 2, *D) (x0, z), got a batch of {tuple(x.shape)}")
        t = self.process.sample_time(x.shape[0], generator).to(device=x.device, dtype=x.dtype)
        return self._regress(model, x[:, 0], x[:, 1], t, cond)


LOSSES = {"dsm": DenoisingScoreMatching, "eps_mse": EpsilonMSE, "ism": ImplicitScoreMatching,
          "ssm": SlicedScoreMatching, "huang_elbo": HuangELBO, "vlb": DiscreteELBO, "edm": EDMLoss,
          "flow_matching": FlowMatchingLoss, "reflow": ReflowLoss}


def loss_options(name: str) -> tuple[str, ...]:
    """The keyword options the loss `name` accepts besides process and parameterization."""
    params = inspect.signature(LOSSES[name].__init__).parameters
    return tuple(p for p in params if p not in ("self", "process", "parameterization"))


def build_loss(name: str, process: Process, parameterization: str,
               **options: object) -> _PerturbedLoss | DiscreteELBO | FlowMatchingLoss:
    """The loss registered as `name`, configured by its keyword options; ValueError names the allowed values."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    allowed = loss_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for loss {name!r}; allowed: {', '.join(allowed)}")
    return LOSSES[name](process, parameterization, **options)
