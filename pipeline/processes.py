"""Forward noising processes behind one abstraction; samplers and losses only ask it.

x_t = mean_coef(t) * x0 + std(t) * z. Time t is a tensor of shape (B,); `append_dims`
broadcasts it against x of shape (B, *D), so everything works on points and images.
Continuous processes follow Song et al. 2021 (arXiv:2011.13456, sec. 3.4 and appendix B);
discrete ones (NCSN's sigmas, DDPM's betas) expose their grid.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
from torch import Tensor

from pipeline import rng


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape v of shape (B,) to (B, 1, ..., 1) with `ndim` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _std_normal_logp(z: Tensor, scale: float) -> Tensor:
    """log N(z; 0, scale^2 I) summed over all but the batch dimension, (B,)."""
    d = z[0].numel()
    return -0.5 * (z**2).flatten(1).sum(1) / scale**2 - d * (math.log(scale) + 0.5 * math.log(2 * math.pi))


class Process(ABC):
    """A forward process: marginals, SDE, prior, training-time distribution and sampling grid.

    Subclasses set `t_min` (the data end: eps for continuous processes) and `t_max` (T), and override the
    capability properties below (as class attributes) where they differ from the defaults; callers ask these,
    never probe a method. A method a process lacks raises NotImplementedError with `why_not`'s reason.
    """

    t_min: float
    t_max: float

    @property
    def continuous(self) -> bool:
        """Whether time is continuous on [t_min, t_max], so `grid` needs a number of steps; False: its own grid."""
        return True

    @property
    def has_sde(self) -> bool:
        """Whether `sde` gives the forward SDE's drift and diffusion g(t) (likelihood weighting, Huang's ELBO)."""
        return True

    @property
    def has_importance_sampling(self) -> bool:
        """Whether `sample_time_importance` draws times from Huang et al. 2021's importance density q(t) ∝ g²/std²
        (their sec. 5)."""
        return False

    @property
    def has_discrete_elbo(self) -> bool:
        """Whether the grid is a discrete chain that ends at clean data (std 0), so pipeline.elbo's bound exists."""
        return False

    def why_not(self, capability: str) -> str:
        """Why the method behind the has_* property `capability` (one that is False) raises NotImplementedError."""
        if capability == "has_importance_sampling":
            return f"importance sampling of t is derived for the VP SDE and EDM's process only, not {type(self).__name__}"
        if capability == "has_sde":
            return f"{type(self).__name__} has no SDE"
        raise ValueError(f"{capability!r} is no capability with a method that raises NotImplementedError; "
                         f"allowed: has_sde, has_importance_sampling")

    @abstractmethod
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean_coef, std) of p(x_t | x0), each of shape (B,)."""

    @abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift f(x, t) shaped like x, diffusion g(t) of shape (B,)) of dx = f dt + g dW."""

    def prior_std(self) -> float:
        """The std of the Gaussian prior N(0, prior_std^2 I) at t_max."""
        return 1.0

    def prior_sample(self, shape: Sequence[int], generator: rng.Generator, device: Optional[torch.device | str] = None,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
        """A draw from the prior p_T of the given (B, *D) shape, on `device` (default dtype unless given).

        `generator` is a torch.Generator or per-sample SampleGenerators (pipeline.rng); the draw is made
        where the generator lives and scaled there, then moved, so its bits do not depend on `device`.
        """
        return (self.prior_std() * rng.randn(shape, generator, dtype=dtype)).to(device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log p_T(z), shape (B,)."""
        return _std_normal_logp(z, self.prior_std())

    @abstractmethod
    def conditioning(self, t: Tensor) -> Tensor:
        """What the network is conditioned on, shape (B,)."""

    @abstractmethod
    def spec(self) -> dict:
        """Plain JSON data that rebuilds this process with `process_from_spec`."""

    def sample_time(self, batch: int, generator: Optional[torch.Generator]) -> Tensor:
        """Training times, one per example, shape (B,): uniform_time unless the process trains otherwise (EDM)."""
        return self.uniform_time(batch, generator)

    def uniform_time(self, batch: int, generator: Optional[torch.Generator]) -> Tensor:
        """Times uniform on [t_min, t_max], one per example, shape (B,): what a time integral's estimate draws."""
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * u).to(torch.get_default_dtype())

    def grid(self, steps: Optional[int] = None) -> Tensor:
        """The float64 sampling grid t_max -> t_min with `steps` intervals, walked as zip(t[:-1], t[1:])."""
        if steps is None or steps < 1:
            raise ValueError(f"a continuous process needs a number of steps >= 1, got {steps}")
        return torch.linspace(self.t_max, self.t_min, steps + 1, dtype=torch.float64)

    def sample_time_importance(self, batch: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Times from an importance density q(t) and their weights 1/q(t), each (B,); see has_importance_sampling."""
        raise NotImplementedError(self.why_not("has_importance_sampling"))

    def marginal_rates(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(dm/dt, dstd/dt) of the marginal at times t (B,), by forward-mode autograd of `marginal` in float64; the
        conditional velocity of x_t = m x0 + std z is m' x0 + std' z (Lipman et al. 2023, arXiv:2210.02747, eq. 15)."""
        t64 = t.detach().to(torch.float64)
        _, (dm, ds) = torch.func.jvp(self.marginal, (t64,), (torch.ones_like(t64),))
        return dm.to(t.dtype), ds.to(t.dtype)

    def perturb(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """x_t = mean_coef(t) x0 + std(t) z."""
        m, s = self.marginal(t)
        return append_dims(m, x0.ndim).to(x0.dtype) * x0 + append_dims(s, x0.ndim).to(x0.dtype) * z

    def transition(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_{t|s}, sigma_{t|s}) with x_t | x_s ~ N(alpha x_s, sigma^2 I) for s < t, each (B,).

        alpha = m_t / m_s and sigma^2 = std_t^2 - alpha^2 std_s^2: exact for every linear process
        here with Gaussian transitions (Kingma et al. 2021, VDM, eq. (5)); it gives the DDPM and
        SMLD discretisations of Song et al. 2021, appendix D/E.
        """
        m_t, std_t = self.marginal(t)
        m_s, std_s = self.marginal(s)
        alpha = m_t / m_s
        return alpha, torch.sqrt(torch.clamp(std_t**2 - alpha**2 * std_s**2, min=0.0))

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (like x) and variance (B,) of q(x_s | x_t, x0) for s < t, the Gaussian chain's posterior.

        mean = (alpha std_s^2 x_t + m_s sigma_ts^2 x0) / std_t^2, variance sigma_ts^2 std_s^2 / std_t^2
        with (alpha, sigma_ts) = transition(t, s): Ho et al. 2020 (arXiv:2006.11239) eq. (6)-(7) for
        DDPM's chain, Kingma et al. 2021 (VDM) eq. (9) in general. At a clean end (std_s = 0) it is x0.
        """
        (m_s, std_s), (_, std_t) = self.marginal(s), self.marginal(t)
        alpha, sigma_ts = self.transition(t, s)
        b = lambda v: append_dims(v, x_t.ndim).to(x_t.dtype)  # noqa: E731
        mean = (b(alpha * std_s**2) * x_t + b(m_s * sigma_ts**2) * x0) / b(std_t**2)
        return mean, sigma_ts**2 * std_s**2 / std_t**2

    def discretize(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Discrete forward step from s to t > s as x_t = x_s + f + G z: returns (f shaped like x, G (B,))."""
        alpha, sigma = self.transition(t, s)
        return (append_dims(alpha, x.ndim).to(x.dtype) - 1) * x, sigma


class _LinearBeta(Process):
    """The linear schedule beta(t) = beta_min + t (beta_max - beta_min) shared by VP and sub-VP."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def conditioning(self, t: Tensor) -> Tensor:
        return 1000.0 * t / self.t_max  # DDPM-style timestep scale for the sinusoidal embedding

    def spec(self) -> dict:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min, "t_max": self.t_max}


class VPSDE(_LinearBeta):
    """Variance preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW, beta linear (eq. (11), (32))."""

    kind = "vp"
    has_importance_sampling = True

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.exp(-0.5 * self.int_beta(t))
        return m, torch.sqrt(-torch.expm1(-self.int_beta(t)))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.beta(t)
        return -0.5 * append_dims(b, x.ndim).to(x.dtype) * x, torch.sqrt(b)

    def sample_time_importance(self, batch: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Times from q(t) ∝ g^2/std^2 = beta(t) / (1 - exp(-B(t))), held constant below t_min.

        Huang et al. 2021 (arXiv:2106.02808, sec. 5, sdeflow-light): the density of the
        ELBO's time integrand variance-reducing proposal. The CDF of beta/(1-e^-B) is
        log(e^B - 1) + const, inverted in closed form. Returns (t, 1/q(t)), each (B,).
        """
        b0 = float(self.int_beta(torch.tensor(self.t_min, dtype=torch.float64)))
        b1 = float(self.int_beta(torch.tensor(self.t_max, dtype=torch.float64)))
        q0 = self.beta_min_density()
        const_mass = q0 * self.t_min  # the flat part on [0, t_min]
        log_part = math.log(math.expm1(b1)) - math.log(math.expm1(b0))
        total = const_mass + log_part
        u = torch.rand(batch, generator=generator, dtype=torch.float64) * total
        flat = u < const_mass
        # invert log(e^B - 1) = log(e^b0 - 1) + (u - const_mass)
        target = torch.log(torch.expm1(torch.tensor(b0, dtype=torch.float64))) + (u - const_mass)
        big_b = target + torch.log1p(torch.exp(-target))  # B = log(e^target + 1), stably
        a, c = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        t_log = (-c + torch.sqrt(c**2 + 4 * a * big_b)) / (2 * a)
        t = torch.where(flat, u / q0, t_log)
        density = torch.where(flat, torch.full_like(t, q0), self.beta(t) / -torch.expm1(-self.int_beta(t))) / total
        return t.to(torch.get_default_dtype()), (1.0 / density).to(torch.get_default_dtype())

    def beta_min_density(self) -> float:
        """beta(t_min) / (1 - exp(-B(t_min))): the proposal's unnormalised value held below t_min."""
        t = torch.tensor(self.t_min, dtype=torch.float64)
        return float(self.beta(t) / -torch.expm1(-self.int_beta(t)))


class SubVPSDE(_LinearBeta):
    """sub-VP SDE: drift of VP, diffusion sqrt(beta(t) (1 - exp(-2 B(t)))), std = 1 - mean_coef^2 (eq. (12))."""

    kind = "subvp"

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.exp(-0.5 * self.int_beta(t))
        return m, -torch.expm1(-self.int_beta(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.beta(t)
        return -0.5 * append_dims(b, x.ndim).to(x.dtype) * x, torch.sqrt(b * -torch.expm1(-2 * self.int_beta(t)))


class VESDE(Process):
    """Variance exploding SDE dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dW, sigma geometric (eq. (9), (30))."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, t_max

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # score_sde's convention: std = sigma(t), not sqrt(sigma(t)^2 - sigma_min^2)
        return torch.ones_like(t), self.sigma(t)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def prior_std(self) -> float:
        return self.sigma_max

    def conditioning(self, t: Tensor) -> Tensor:
        return torch.log(self.sigma(t))

    def spec(self) -> dict:
        return {"kind": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "t_min": self.t_min, "t_max": self.t_max}


class OUProcess(Process):
    """Ornstein-Uhlenbeck process dx = -1/2 x dt + dW: mean e^{-t/2}, variance 1 - e^{-t}.

    T = 10 leaves mean_coef e^{-5} at the prior end, as VP with beta 0.1 -> 20 does.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 10.0):
        self.t_min, self.t_max = t_min, t_max

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.exp(-0.5 * t), torch.sqrt(-torch.expm1(-t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return -0.5 * x, torch.ones_like(t)

    def conditioning(self, t: Tensor) -> Tensor:
        return 1000.0 * t / self.t_max

    def spec(self) -> dict:
        return {"kind": "ou", "t_min": self.t_min, "t_max": self.t_max}


class BrownianMotion(Process):
    """Brownian motion dX = sigma dW on [0, 1], the reference of a Schrödinger bridge (pipeline.bridge).

    X_t | X_0 ~ N(X_0, sigma^2 t I): mean_coef 1, std sigma sqrt(t). With it, the bridge's law of (X_0, X_1) is the
    entropic optimal-transport plan for the cost |x - y|^2 / 2 with regularisation sigma^2 (De Bortoli et al. 2021,
    arXiv:2106.01357, sec. 3). It starts from data, not a prior: prior_std is the std of X_1 - X_0.
    """

    kind = "brownian"

    def __init__(self, sigma: float = 1.0, t_min: float = 0.0, t_max: float = 1.0):
        if not sigma > 0:
            raise ValueError(f"Brownian motion needs sigma > 0, got {sigma}")
        self.sigma, self.t_min, self.t_max = float(sigma), t_min, t_max

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.sigma * torch.sqrt(t)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), self.sigma * torch.ones_like(t)

    def prior_std(self) -> float:
        return self.sigma

    def conditioning(self, t: Tensor) -> Tensor:
        return 1000.0 * t / self.t_max  # as VP: DDPM's timestep scale for the sinusoidal embedding

    def spec(self) -> dict:
        return {"kind": "brownian", "sigma": self.sigma, "t_min": self.t_min, "t_max": self.t_max}


class EDMProcess(Process):
    """EDM's process x_σ = x0 + σ z with time t = σ (Karras et al. 2022, arXiv:2206.00364, sec. 2 and Table 1).

    m = 1, std = t, the SDE dx = sqrt(2 t) dW (their eq. 6 with σ(t) = t, s(t) = 1), the prior N(0, σ_max² I),
    and training noise levels from their log-normal, ln σ ~ N(P_mean, P_std²) (Table 1, "Ours"). The network is
    conditioned on σ itself; pipeline.nets.edm's preconditioning turns it into c_noise = ln(σ) / 4. Time integrals
    (Huang's ELBO) draw uniform_time or Huang's q(t) ∝ g²/std², log-uniform here, not the training σ.
    """

    has_importance_sampling = True

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, p_mean: float = -1.2, p_std: float = 1.2):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not p_std > 0:
            raise ValueError(f"EDM's P_std must be > 0, got {p_std}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), torch.sqrt(2 * t)

    def prior_std(self) -> float:
        return self.t_max

    def conditioning(self, t: Tensor) -> Tensor:
        return t

    def spec(self) -> dict:
        return {"kind": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max, "p_mean": self.p_mean,
                "p_std": self.p_std}

    def sample_time(self, batch: int, generator: Optional[torch.Generator]) -> Tensor:
        """Training σ = exp(P_mean + P_std n), n ~ N(0, 1), one per example (EDM's log-normal; not clipped to
        [σ_min, σ_max], as in their code), shape (B,)."""
        n = torch.randn(batch, generator=generator, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * n).to(torch.get_default_dtype())

    def sample_time_importance(self, batch: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Huang et al.'s q(t) ∝ g²/std² = 2/t on [σ_min, σ_max]: log-uniform σ; returns (t, 1/q(t)), each (B,)."""
        span = math.log(self.t_max / self.t_min)
        t = self.t_min * torch.exp(span * torch.rand(batch, generator=generator, dtype=torch.float64))
        return t.to(torch.get_default_dtype()), (t * span).to(torch.get_default_dtype())

    def grid(self, steps: Optional[int] = None, rho: float = 7.0) -> Tensor:
        """EDM's ρ-schedule (their eq. 5, ρ = 7) from σ_max to σ_min with `steps` intervals, float64: the grid every
        sampler of this process walks (ancestral, DDIM, PC, the fixed-step ODE); edm_heun adds the step to σ = 0."""
        if steps is None or steps < 1:
            raise ValueError(f"a continuous process needs a number of steps >= 1, got {steps}")
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        t = (self.t_max ** (1 / rho) + i * (self.t_min ** (1 / rho) - self.t_max ** (1 / rho))) ** rho
        t[0], t[-1] = self.t_max, self.t_min
        return t


class LinearPath(Process):
    """The conditional OT path of flow matching, x_t = (1 − t) x0 + (σ_min + (1 − σ_min) t) z on [0, 1], data at 0.

    Lipman et al. 2023 (arXiv:2210.02747, eq. 20-23) with time reversed to this module's convention (their t = 0 is
    noise, here the data end is t = 0): m = 1 − t, std = σ_min + (1 − σ_min) t, so m' = −1 and std' = 1 − σ_min, and
    the conditional velocity dx_t/dt = std' z − x0 is the regression target. σ_min = 0 is the rectified flow of Liu
    et al. 2023 (arXiv:2209.03003, eq. 1). The prior N(0, I) is exact at t = 1 (m = 0). The path's SDE drift
    (m'/m) x and any score-to-x0 conversion divide by m, which vanishes at t = 1: the family samples and measures
    likelihoods with the velocity (pipeline.samplers.ode), so has_sde is False. Times are uniform on [0, 1].
    """

    kind = "linear_path"
    has_sde = False

    def __init__(self, sigma_min: float = 0.0, t_min: float = 0.0, t_max: float = 1.0):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"the linear path needs 0 <= sigma_min < 1, got {sigma_min}")
        self.sigma_min, self.t_min, self.t_max = float(sigma_min), float(t_min), float(t_max)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, self.sigma_min + (1 - self.sigma_min) * t

    def marginal_rates(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.full_like(t, 1 - self.sigma_min)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(self.why_not("has_sde"))

    def why_not(self, capability: str) -> str:
        if capability == "has_sde":
            return ("the linear path's SDE drift (m'/m) x is singular at t = 1, where m = 0; flow matching is "
                    "sampled and measured through its velocity (the ODE samplers, the ODE likelihood)")
        return super().why_not(capability)

    def conditioning(self, t: Tensor) -> Tensor:
        return 1000.0 * t / self.t_max  # as VP: DDPM's timestep scale for the sinusoidal embedding

    def spec(self) -> dict:
        return {"kind": "linear_path", "sigma_min": self.sigma_min, "t_min": self.t_min, "t_max": self.t_max}


class NoiseScaleProcess(Process):
    """NCSN's discrete noise scales as a variance-exploding process with time t = sigma.

    x_sigma = x0 + sigma z (Song & Ermon 2019, arXiv:1907.05600, eq. (5)); as an SDE,
    dx = sqrt(d sigma^2 / d sigma) dW = sqrt(2 sigma) dW, the VE SDE of Song et al. 2021
    parameterised by sigma itself. The prior is N(0, sigma_1^2 I). Its grid ends at sigma_L > 0: no ELBO.
    """

    continuous = False

    def __init__(self, sigmas: Sequence[float]):
        s = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if s.ndim != 1 or len(s) < 1 or (s <= 0).any() or (len(s) > 1 and (s[1:] >= s[:-1]).any()):
            raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of positive numbers")
        self.sigmas = s
        self.t_min, self.t_max = float(s[-1]), float(s[0])

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), torch.sqrt(2 * t)

    def prior_std(self) -> float:
        return float(self.sigmas[0])

    def conditioning(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def spec(self) -> dict:
        return {"kind": "noise_scales", "sigmas": self.sigmas.tolist()}

    def sample_time(self, batch: int, generator: Optional[torch.Generator]) -> Tensor:
        """One noise scale per example, uniform over the L scales (NCSN's training distribution)."""
        idx = torch.randint(len(self.sigmas), (batch,), generator=generator)
        return self.sigmas[idx].to(torch.get_default_dtype())

    def grid(self, steps: Optional[int] = None) -> Tensor:
        """The noise levels sigma_1 > ... > sigma_L (annealed Langevin visits each); `steps` must be None or L."""
        if steps not in (None, len(self.sigmas)):
            raise ValueError(f"NCSN's grid has exactly {len(self.sigmas)} noise levels, got steps={steps}")
        return self.sigmas.clone()


def linear_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0, max_beta: float = 0.999) -> Tensor:
    """The linear schedule beta_i = beta_min/N + i (beta_max - beta_min) / (N (N - 1)), float64 (N,).

    The DDPM discretisation of the VP SDE (Song et al. 2021, appendix B); for N = 1000 it is
    DDPM's 1e-4 -> 0.02 (Ho et al. 2020, sec. 4), and for fewer steps it keeps the same total noise
    (clipped at max_beta, as for the cosine schedule, when N < 20 would push beta_N past 1).
    """
    if num_steps < 2:
        raise ValueError(f"a linear schedule needs at least 2 steps, got {num_steps}")
    betas = beta_min / num_steps + torch.arange(num_steps, dtype=torch.float64) * (beta_max - beta_min) / (
        num_steps * (num_steps - 1))
    return torch.clamp(betas, max=max_beta)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. (17)): alpha_bar(t) = cos^2((t/N + s)/(1 + s) pi/2)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


class DiscreteVP(Process):
    """DDPM's discrete forward chain q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I).

    Time is the step index i in {0, ..., N-1} as a float (DDPM's t = i + 1); i = -1 is the
    clean data (mean_coef 1, std 0), the end of every sampling grid. Ho et al. 2020, eq. (4):
    x_i = sqrt(alpha_bar_i) x0 + sqrt(1 - alpha_bar_i) z. A chain without an SDE.
    """

    continuous = False
    has_sde = False
    has_discrete_elbo = True

    def __init__(self, betas: Tensor):
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        if self.betas.ndim != 1 or (self.betas <= 0).any() or (self.betas >= 1).any():
            raise ValueError("betas must be a 1-D sequence in (0, 1)")
        self.alpha_bars = torch.cumprod(1 - self.betas, 0)
        # index -1 (clean data) first, so that table[i + 1] is step i
        self._table = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars])
        self.num_steps = len(self.betas)
        self.t_min, self.t_max = -1.0, float(self.num_steps - 1)

    def _alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at step indices t (B,), float64 on t's device (the table is moved where t lives).

        The range check reads the indices, so it runs where that is free (t on the CPU); elsewhere it
        would be a host sync in every sampler step, and the same code paths are checked on the CPU.
        """
        idx = torch.round(t.to(torch.float64)).long() + 1
        if idx.device.type == "cpu" and ((idx < 0).any() or (idx > self.num_steps).any()):
            raise ValueError(f"DDPM step index out of range [-1, {self.num_steps - 1}]")
        return self._table.to(idx.device)[idx]

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self._alpha_bar(t).to(t.dtype)
        return torch.sqrt(ab), torch.sqrt(1 - ab)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(self.why_not("has_sde"))

    def why_not(self, capability: str) -> str:
        if capability == "has_sde":
            return ("DDPM's forward process is a discrete chain without an SDE; "
                    "use the ddpm or ddim samplers, or method.name: sde with method.sde: vp")
        return super().why_not(capability)

    def conditioning(self, t: Tensor) -> Tensor:
        return t.to(torch.get_default_dtype())

    def spec(self) -> dict:
        return {"kind": "discrete_vp", "betas": self.betas.tolist()}

    def sample_time(self, batch: int, generator: Optional[torch.Generator]) -> Tensor:
        """A uniform step index in {0, ..., N-1} per example (DDPM's t ~ U{1..N})."""
        return torch.randint(self.num_steps, (batch,), generator=generator).to(torch.get_default_dtype())

    def grid(self, steps: Optional[int] = None) -> Tensor:
        """N-1, ..., 0, -1 (all steps), or `steps` evenly strided indices then -1 (DDIM, sec. 4.2)."""
        n = self.num_steps if steps is None else steps
        if not 1 <= n <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        idx = torch.round(torch.linspace(self.num_steps - 1, 0, n, dtype=torch.float64))
        return torch.cat([torch.unique_consecutive(idx), torch.tensor([-1.0], dtype=torch.float64)])


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


# Every process by the `kind` of its spec(): the registry process_from_spec rebuilds from.
PROCESSES: dict[str, type[Process]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "ou": OUProcess,
                                       "edm": EDMProcess, "brownian": BrownianMotion, "linear_path": LinearPath,
                                       "noise_scales": NoiseScaleProcess, "discrete_vp": DiscreteVP}


def process_from_spec(spec: dict) -> Process:
    """Rebuild a process from its `spec()` (the record the noise_scales stage writes)."""
    kind, args = spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
    if kind not in PROCESSES:
        raise ValueError(f"unknown process kind {kind!r}; allowed: {', '.join(PROCESSES)}")
    if kind == "discrete_vp":
        return DiscreteVP(torch.tensor(args["betas"], dtype=torch.float64))
    return PROCESSES[kind](**args)


def build_process(kind: str, *, sigmas: Sequence[float] = (), num_steps: Optional[int] = None,
                  schedule: str = "linear") -> Process:
    """The process of a plan's kind (families.base.Plan.process). `sigmas`: NCSN's noise scales from the noise_scales
    stage; VE takes its sigma_max (technique 1, as Song et al. 2021 do) and sigma_min from them. VP and sub-VP use
    beta 0.1 -> 20 with eps 1e-3, VE eps 1e-5 (Song et al. 2021, appendix C). A family with a process of its own
    (EDM's, a bridge's reference) builds it itself."""
    if kind == "noise_scales":
        return NoiseScaleProcess(sigmas)
    if kind == "discrete_vp":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        return DiscreteVP(SCHEDULES[schedule](num_steps))
    if kind == "ve":
        return VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
    builders = {"vp": VPSDE, "subvp": SubVPSDE, "ou": OUProcess}
    if kind not in builders:
        raise ValueError(f"unknown process kind {kind!r}; allowed: noise_scales, discrete_vp, ve, {', '.join(builders)}")
    return builders[kind]()
