"""Which process, loss, parameterization and sampler each method uses, and which combinations exist.

`plan(...)` resolves every 'auto' of method.* and sample.sampler and refuses a combination that
is not defined, with a message that says what works; params validation calls it, so a bad
`dvc exp run -S` fails before any stage runs. `build_process` turns the resolved kind into a
Process (pipeline.processes), the only place that knows each method's defaults. The `check_*`
functions are the other method rules params validation asks (pipeline.config), each a ValueError
that says what works; `noise_defaults` and `needs_noise_scales` are what the noise_scales stage asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # the rules run when params load, in every stage: torch (processes) only where a process is built
    from pipeline.processes import Process

METHODS = ("ncsnv2", "ncsn", "exact_score", "ddpm", "sde", "sohl_dickstein", "edm", "schrodinger_bridge")
# The Schrödinger bridge's plan: its process is a reference chosen by method.sb (pipeline.bridge), its loss and
# sampler are its own loop and walk (pipeline.bridge_train), and its networks output drifts.
BRIDGE = "bridge"
SDES = ("vp", "ve", "subvp", "ou")
# Process kinds with continuous time (and an SDE): the SDEs and EDM's own x0 + σ z.
CONTINUOUS_KINDS = (*SDES, "edm")
LOSS_NAMES = ("dsm", "eps_mse", "ism", "ssm", "elbo")
# EDM's noise levels and training distribution (Karras et al. 2022, Table 1, "Ours"); sample.sampler auto there is
# their Heun sampler.
EDM_PROCESS = {"sigma_min": 0.002, "sigma_max": 80.0, "p_mean": -1.2, "p_std": 1.2}
SAMPLERS = ("annealed_langevin", "ancestral", "ddim", "pc", "ode", "edm_heun", "dpm_solver")
# Samplers that need only the marginals at the grid's times, so they walk any score model's grid: a continuous
# process, DDPM's chain or NCSN's scales (pipeline.samplers.fast).
FAST_SAMPLERS = ("edm_heun", "dpm_solver")
SCORE_PARAMETERIZATIONS = ("score", "score_over_sigma", "eps", "x0", "drift")
# The chain length when method.num_steps is 'auto': DDPM's N = 1000 (Ho et al. 2020); Sohl-Dickstein
# et al. 2015 use T = 40 steps for their 2-D swiss roll.
DEFAULT_NUM_STEPS = {"ddpm": 1000, "sohl_dickstein": 40}
# Grid intervals when sample.steps is 'auto' on a continuous SDE (Song et al. 2021 use N = 1000).
DEFAULT_SDE_STEPS = 1000
# A DDPM trained on its ELBO keeps the reverse variance beta: on continuous 2-D data the bound is
# tight with it and loose with beta_tilde (tests/test_elbo.py measures both).
VLB_VARIANCE = "beta"


@dataclass(frozen=True)
class Plan:
    """A method's resolved choices: process kind, registry loss (None: nothing is trained), parameterization,
    sampler, and which likelihoods exist ("ode" for a continuous process; "discrete" or "huang" ELBO)."""

    process: str
    loss: Optional[str]
    parameterization: str
    sampler: str
    ode: bool
    elbo: Optional[str]


def _process_kind(name: str, sde: str) -> str:
    if name in ("ddpm", "sohl_dickstein"):
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: {name}, which has its own discrete chain "
                             f"(leave method.sde: auto); for a continuous {sde} SDE use method.name: sde")
        return "discrete_vp"
    if name in ("ncsn", "ncsnv2"):
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: {name} (NCSN's noise scales); "
                             f"use method.name: sde with method.sde: {sde}")
        return "noise_scales"
    if name == "sde":
        return "vp" if sde == "auto" else sde
    if name == "schrodinger_bridge":
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: schrodinger_bridge, whose reference "
                             f"process is method.sb.reference (brownian or vp); leave method.sde: auto")
        return BRIDGE
    if name == "edm":
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: edm, which has its own process "
                             f"x0 + sigma z (leave method.sde: auto); for the {sde} SDE use method.name: sde")
        return "edm"
    return "noise_scales" if sde == "auto" else sde  # exact_score: NCSN's scales, or any SDE


def _loss(name: str, kind: str, loss: str) -> Optional[str]:
    if name == "exact_score":
        if loss != "auto":
            raise ValueError("method.name: exact_score trains nothing (the score is analytic); leave method.loss: auto")
        return None
    if name == "schrodinger_bridge":
        if loss != "auto":
            raise ValueError(f"method.name: schrodinger_bridge trains with its solver's own regression "
                             f"(method.sb.solver: ipf or dsbm); leave method.loss: auto, got {loss}")
        return BRIDGE
    if name == "edm":
        if loss != "auto":
            raise ValueError(f"method.name: edm trains on its own loss (Karras et al.'s weighted denoising loss with "
                             f"log-normal sigma); leave method.loss: auto, got {loss}")
        return "edm"
    if name == "sohl_dickstein":
        if loss not in ("auto", "elbo"):
            raise ValueError(f"method.name: sohl_dickstein is trained on its ELBO only (method.loss: auto or elbo), "
                             f"got method.loss: {loss}")
        return "vlb"
    if loss == "auto":
        return "eps_mse" if name == "ddpm" else "dsm"
    if loss == "elbo":
        if kind == "noise_scales":
            raise ValueError("method.loss: elbo is not defined for NCSN's noise scales (no chain to a clean decoder, "
                             "no SDE); the ELBO exists for method.name ddpm, sohl_dickstein and sde")
        return "vlb" if kind == "discrete_vp" else "huang_elbo"
    return loss


def _parameterization(name: str, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
    if name == "sohl_dickstein":
        if parameterization not in ("auto", "kernel"):
            raise ValueError(f"method.name: sohl_dickstein learns the reverse kernel's mean and variance "
                             f"(method.parameterization: auto or kernel), got {parameterization}")
        return "kernel"
    if parameterization == "kernel":
        raise ValueError("method.parameterization: kernel (a learned mean and variance) is Sohl-Dickstein's; "
                         f"for method.name: {name} use one of {', '.join(SCORE_PARAMETERIZATIONS)}")
    if name == "schrodinger_bridge":
        if parameterization not in ("auto", "drift"):
            raise ValueError(f"method.name: schrodinger_bridge's two networks output drifts; leave "
                             f"method.parameterization: auto (or drift), got {parameterization}")
        return "drift"
    if name == "edm":
        if parameterization not in ("auto", "x0"):
            raise ValueError(f"method.name: edm's preconditioned network outputs the denoised x0 (c_skip x + c_out F); "
                             f"leave method.parameterization: auto (or x0), got {parameterization}")
        return "x0"
    if name == "exact_score":
        if parameterization != "auto":
            raise ValueError("method.name: exact_score has no network (the score is analytic); leave "
                             "method.parameterization: auto")
        return "score"
    if parameterization != "auto":
        if parameterization == "drift" and name == "ddpm":
            raise ValueError("method.parameterization: drift (Huang's a = g s) needs an SDE; DDPM's chain has none. "
                             "Use method.name: sde, or eps / x0 / score for ddpm")
        return parameterization
    if name in ("ncsn", "ncsnv2"):
        return "score_over_sigma" if scale_by_sigma else "score"
    return "drift" if loss == "huang_elbo" else "eps"


def _sampler(name: str, kind: str, sampler: str) -> str:
    if name == "schrodinger_bridge":
        if sampler != "auto":
            raise ValueError(f"sample.sampler: {sampler} walks a score model from noise; a Schrödinger bridge is "
                             f"sampled by walking its learned drift from one data set to the other (leave "
                             f"sample.sampler: auto, and pick the way with sample.direction)")
        return BRIDGE
    if sampler == "auto":
        if name == "edm":
            return "edm_heun"
        if name == "sohl_dickstein" or kind == "discrete_vp":
            return "ancestral"
        return "annealed_langevin" if kind == "noise_scales" else "pc"
    if name == "sohl_dickstein" and sampler != "ancestral":
        raise ValueError(f"sample.sampler: {sampler} needs a score; Sohl-Dickstein's model is a reverse kernel, "
                         f"sampled with sample.sampler: ancestral (or auto)")
    if sampler == "annealed_langevin" and kind != "noise_scales":
        raise ValueError(f"sample.sampler: annealed_langevin walks NCSN's noise scales (method.name ncsn, ncsnv2, "
                         f"or exact_score with method.sde: auto); for {kind} use ancestral, ddim, pc, ode, edm_heun or dpm_solver")
    if sampler in ("pc", "ode") and kind == "discrete_vp":
        raise ValueError(f"sample.sampler: {sampler} needs an SDE; DDPM's discrete chain has none. "
                         f"Use ancestral, ddim, edm_heun or dpm_solver (they step between the chain's own times), "
                         f"or method.name: sde for the continuous VP SDE")
    if sampler == "ode" and kind == "noise_scales":
        raise ValueError("sample.sampler: ode integrates in continuous time, and NCSN's noise scales are a discrete "
                         "grid. Use edm_heun or dpm_solver (they step between the scales), method.name: sde "
                         "(method.sde: ve is NCSN's continuous limit), or exact_score with method.sde vp, ve, subvp or ou")
    return sampler


def plan(name: str, sde: str = "auto", loss: str = "auto", weighting: str = "sigma2", parameterization: str = "auto",
         t_sampling: str = "uniform", scale_by_sigma: bool = True, sampler: str = "auto",
         likelihood: bool = False) -> Plan:
    """Resolve the method's choices; ValueError says what is not defined and what works instead."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    kind = _process_kind(name, sde)
    registry_loss = _loss(name, kind, loss)
    param = _parameterization(name, registry_loss, parameterization, scale_by_sigma)
    continuous = kind in CONTINUOUS_KINDS
    if weighting == "likelihood" and (registry_loss not in ("dsm", "ism", "ssm") or not continuous):
        # Song et al. 2021 (arXiv:2101.09258) bound the KL with lambda = g^2 for t uniform over an SDE's
        # time; NCSN's scales are drawn uniformly from a geometric grid, so g^2 there is neither that bound
        # nor NCSN's objective.
        raise ValueError(f"method.weighting: likelihood (g^2) weights a score-matching loss (dsm, ism, ssm) over a "
                         f"continuous SDE (method.name: sde); it does not apply to method.name: {name} with loss "
                         f"{registry_loss}")
    if t_sampling == "importance" and not (kind == "vp" and registry_loss in ("dsm", "ism", "ssm", "huang_elbo")):
        raise ValueError("method.t_sampling: importance (Huang et al.'s q(t) ∝ g^2/std^2) is derived for the VP SDE: "
                         "use method.name: sde, method.sde: vp with method.loss dsm, ism, ssm or elbo")
    if likelihood and kind == BRIDGE:
        raise ValueError("eval.likelihood: true computes a score model's likelihood; method.name: schrodinger_bridge "
                         "is evaluated by cd / emd at its end and the cost of its coupling (leave eval.likelihood: false)")
    if likelihood and kind == "noise_scales":
        raise ValueError("eval.likelihood: true needs a model with a likelihood: the probability-flow ODE of an SDE "
                         "(method.name: sde, or exact_score with method.sde vp/ve/subvp/ou) or an ELBO "
                         "(method.name: ddpm, sohl_dickstein); NCSN's noise scales have neither")
    elbo = "discrete" if kind == "discrete_vp" else ("huang" if continuous else None)
    return Plan(kind, registry_loss, param, _sampler(name, kind, sampler), continuous, elbo)


def num_steps_for(name: str, num_steps: int | str) -> Optional[int]:
    """The discrete chain's length: method.num_steps, or DEFAULT_NUM_STEPS when 'auto'; None without a chain."""
    if name not in DEFAULT_NUM_STEPS:
        return None
    return DEFAULT_NUM_STEPS[name] if num_steps == "auto" else int(num_steps)


def build_process(kind: str, *, sigmas: Sequence[float], num_steps: Optional[int] = None,
                  schedule: str = "linear") -> Process:
    """The process of a plan. `sigmas`: NCSN's noise scales from the noise_scales stage; VE takes its
    sigma_max (technique 1, as Song et al. 2021 do) and sigma_min from them. VP and sub-VP use
    beta 0.1 -> 20 with eps 1e-3, VE eps 1e-5 (Song et al. 2021, appendix C)."""
    from pipeline.processes import (SCHEDULES, VESDE, VPSDE, DiscreteVP, EDMProcess, NoiseScaleProcess, OUProcess,
                                    SubVPSDE)

    if kind == "noise_scales":
        return NoiseScaleProcess(sigmas)
    if kind == "discrete_vp":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        return DiscreteVP(SCHEDULES[schedule](num_steps))
    if kind == "ve":
        return VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
    if kind == "edm":
        return EDMProcess(**EDM_PROCESS)
    builders = {"vp": VPSDE, "subvp": SubVPSDE, "ou": OUProcess}
    if kind not in builders:
        raise ValueError(f"unknown process kind {kind!r}")
    return builders[kind]()


def bridge_reference(reference: str, sigma: float) -> Process:
    """A Schrödinger bridge's reference process (method.sb.reference): Brownian motion dX = sigma dW on [0, 1], or
    the VP SDE (beta 0.1 -> 20 on [0, 1], as method.name: sde), whose bridge to N(0, I) is close to the score SDE."""
    from pipeline.processes import VPSDE, BrownianMotion

    if reference == "brownian":
        return BrownianMotion(sigma)
    if reference == "vp":
        return VPSDE(t_min=0.0)
    raise ValueError(f"unknown bridge reference {reference!r}; allowed: brownian, vp")


def loss_options(loss: str, weighting: str, t_sampling: str, decoder: Optional[dict] = None,
                 sigma_data: Optional[float] = None) -> dict:
    """The keyword options of the registry loss `loss` (pipeline.losses.build_loss) from method.* keys.

    decoder: for 8-bit images, the discretised Gaussian decoder of the discrete ELBO (Ho et al. 2020,
    eq. (13); pipeline.pixels.discrete_decoder), so that L_vlb bounds -log P of the pixels. sigma_data: EDM's
    σ_d (the train stage resolves method.sigma_data 'auto' from the data, edm_sigma_data)."""
    if loss == "edm":
        if sigma_data is None:
            raise ValueError("EDM's loss needs sigma_data (resolve method.sigma_data first)")
        return {"sigma_data": float(sigma_data)}
    if loss in ("dsm", "ism", "ssm"):
        return {"weighting": weighting, "t_sampling": t_sampling}
    if loss == "huang_elbo":
        return {"t_sampling": t_sampling}
    if loss == "vlb":
        return {"variance": VLB_VARIANCE, **(decoder or {})}
    return {}


def sampling_steps(process: Process, steps: int | str, sampler: str = "auto") -> Optional[int]:
    """sample.steps resolved: 'auto' is the process's own grid (None) or DEFAULT_SDE_STEPS for an SDE; for the
    few-step samplers (FAST_SAMPLERS) None, their own default (pipeline.samplers.FAST_DEFAULT_STEPS)."""
    if steps != "auto":
        return int(steps)
    if sampler in FAST_SAMPLERS:
        return None
    return DEFAULT_SDE_STEPS if process.continuous else None


def edm_sigma_data(sigma_data: float | str, x) -> float:
    """EDM's σ_d: method.sigma_data, or with 'auto' the std of every coordinate of the training data x (a tensor in
    the model's units: images after pixel scaling), as Karras et al. set 0.5 for CIFAR-10 in [-1, 1]."""
    if sigma_data != "auto":
        return float(sigma_data)
    value = float(x.double().std())
    if not value > 0:
        raise ValueError("method.sigma_data: auto needs training data that are not all equal (their std is 0); "
                         "set method.sigma_data")
    return value


def needs_noise_scales(kind: str) -> bool:
    """Whether the noise_scales stage chooses NCSN's scales for a process kind: NCSN's own, and VE's sigma range."""
    return kind in ("noise_scales", "ve")


def noise_defaults(name: str) -> str:
    """Whose values noise.* 'auto' takes for method.name `name` (pipeline.noise.choose_noise_scales): 'ncsn' (the
    hand-set constants), 'exact_score' (NCSNv2's sigmas with a converged walk), else 'ncsnv2' (its techniques)."""
    return name if name in ("ncsn", "exact_score") else "ncsnv2"


# --------------------------------------------------------------------------- rules params validation asks


def check_chain(name: str, num_steps: int | str, schedule: str) -> Optional[int]:
    """The chain length (num_steps_for); refuses method.num_steps or method.schedule for a method without a chain."""
    chain = num_steps_for(name, num_steps)
    if chain is None and num_steps != "auto":
        raise ValueError(f"method.num_steps sets the chain length of ddpm and sohl_dickstein; leave it 'auto' "
                         f"for method.name: {name} (sample.steps sets the sampling grid)")
    if chain is None and schedule != "linear":
        raise ValueError(f"method.schedule sets the betas of ddpm and sohl_dickstein; leave it 'linear' for "
                         f"method.name: {name}")
    return chain


def check_sample_steps(name: str, kind: str, steps: int | str, chain: Optional[int], sampler: str = "auto") -> None:
    """sample.steps against the method: NCSN's scales (except for the few-step samplers, which pick among them) and
    Sohl-Dickstein's kernels fix the grid, a chain bounds it (`sampler`: the resolved sampler)."""
    if steps == "auto":
        return
    if kind == "noise_scales" and sampler not in FAST_SAMPLERS:
        raise ValueError(f"sample.steps: NCSN's noise scales fix the grid (noise.num_scales levels); leave "
                         f"sample.steps: auto for method.name: {name} (or pick {' or '.join(FAST_SAMPLERS)}, "
                         f"which walk some of the scales)")
    if name == "sohl_dickstein":
        raise ValueError("sample.steps: Sohl-Dickstein's learned kernels exist only for the chain's own steps; "
                         "leave sample.steps: auto (method.num_steps sets the chain)")
    if chain is not None and steps > chain:
        raise ValueError(f"sample.steps ({steps}) must be <= the chain's method.num_steps ({chain})")


def check_data(name: str, data: str) -> None:
    """The data a method needs: exact_score knows the analytic score of a Gaussian mixture only."""
    if name == "exact_score" and data != "gmm":
        raise ValueError(f"method.name: exact_score needs data.name: gmm (the analytic score is known only for a "
                         f"Gaussian mixture); got data.name: {data}. Train a model for {data}: method.name ncsnv2, "
                         f"ncsn, ddpm, sde or sohl_dickstein.")


def check_sigma_data(name: str, sigma_data: float | str) -> None:
    """method.sigma_data is EDM's σ_d; other methods have no preconditioning to give it to."""
    if sigma_data != "auto" and name != "edm":
        raise ValueError(f"method.sigma_data sets EDM's preconditioning (method.name: edm); leave it 'auto' for "
                         f"method.name: {name}")


def check_conditional(name: str) -> None:
    """A class-conditional model (method.conditional) needs a score to guide; Sohl-Dickstein's kernels have none."""
    if name == "schrodinger_bridge":
        raise ValueError("method.conditional: a Schrödinger bridge has no class-conditional form here; use "
                         "method.name ddpm, sde, ncsnv2, ncsn or edm for guided generation")
    if name == "sohl_dickstein":
        raise ValueError("method.conditional: Sohl-Dickstein's learned kernels have no score to guide; use "
                         "method.name ddpm, sde, ncsnv2, ncsn (or exact_score on gmm)")


def check_clip_denoised(name: str, clip_denoised: bool | str) -> None:
    """sample.clip_denoised: true needs an x0_hat to clip; Sohl-Dickstein's kernels predict none."""
    if clip_denoised is True and name == "sohl_dickstein":
        raise ValueError("sample.clip_denoised: Sohl-Dickstein's learned kernels predict no x0_hat to clip; "
                         "leave sample.clip_denoised: auto or false")


def check_task_sampler(task: str, sampler: str, ode_method: str) -> None:
    """inpaint and edit wrap a step over a fixed grid, which SciPy's RK45 (sample.ode_method: rk45) does not walk."""
    if task in ("inpaint", "edit") and sampler == "ode" and ode_method == "rk45":
        raise ValueError(f"sample.task: {task} wraps a step over a fixed grid, and the rk45 ODE solver picks its own "
                         "times: set sample.ode_method: euler or heun")


def check_inpaint_methods(methods: Sequence[str], sampler: str) -> None:
    """Inpainting methods against the resolved sampler: Song & Ermon's langevin wraps annealed Langevin only."""
    if "langevin" in methods and sampler != "annealed_langevin":
        raise ValueError("sample.inpaint.method langevin is Song & Ermon's Algorithm 2 around the annealed_langevin "
                         f"sampler (NCSN's noise scales), not {sampler}; use replace, repaint or mcg")
