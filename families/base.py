"""What a method family declares, and the rules every score-model family shares.

A family is one `Family` object (its module's FAMILY): the process kinds it runs on, its loss, parameterization,
network wrapper, default and accepted samplers, the method.* keys it reads (its own pydantic model), and, where its
stages differ from a score model's, its own stage bodies. `plan` resolves every 'auto' of method.* and
sample.sampler; a combination that is not defined is a ValueError that says what works. Nothing here imports torch
at module level: params validation asks a family in every stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from families import OWNED_KEYS, OWNED_SECTIONS
from pipeline.config import auto_or_at_least
from pipeline.names import FAST_SAMPLERS, SAMPLERS, SDES

if TYPE_CHECKING:
    from pipeline.processes import Process

# Process kinds with continuous time (and an SDE): the SDEs and EDM's own x0 + σ z.
CONTINUOUS_KINDS = (*SDES, "edm")
# Grid intervals when sample.steps is 'auto' on a continuous SDE (Song et al. 2021 use N = 1000).
DEFAULT_SDE_STEPS = 1000
def _or(names: Sequence[str]) -> str:
    """'a, b or c'."""
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def refuse_consistency(sampler: str) -> None:
    """sample.sampler: consistency walks a consistency model, which only the distill stage makes (families.plan)."""
    if sampler == "consistency":
        raise ValueError("sample.sampler: consistency samples a consistency model; set distill.method: cd to distil "
                         "one from this run's model (or pick another sampler)")


class FamilyParams(BaseModel):
    """A family's own method.* keys, validated by the family alone (none here: a family that owns none); each
    family's Params extends it with the keys it reads, defaults from OWNED_KEYS."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SdeParams(FamilyParams):
    """method.sde: the SDE a continuous-time family runs on (Song et al. 2021, sec. 3.4); auto: the family's own."""

    sde: Literal[("auto", *SDES)] = OWNED_KEYS["sde"]


class ChainParams(FamilyParams):
    """method.schedule and method.num_steps: the betas and the length N of a discrete Gaussian chain (Ho et al.
    2020, linear; Nichol & Dhariwal 2021, cosine); auto: the family's own N."""

    schedule: Literal["linear", "cosine"] = OWNED_KEYS["schedule"]
    num_steps: Union[Literal["auto"], int] = OWNED_KEYS["num_steps"]

    @field_validator("num_steps")
    @classmethod
    def _chain_length(cls, v):
        return auto_or_at_least(v, 2)


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


class Family:
    """A score model trained from noise: the defaults below, overridden per family (class attributes and methods).

    name: method.name. paper: who, where. Params: its own pydantic model of the method.* keys it reads (`reads`),
    OWNED_KEYS or a section of OWNED_SECTIONS. noise_defaults: whose values noise.* 'auto' takes
    (pipeline.noise.choose_noise_scales). stages: the module of its own bodies `<stage>_stage` of the stages named
    in own_stages (the others are the score model's, in stages/)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type[FamilyParams]] = FamilyParams
    noise_defaults: ClassVar[str] = "ncsnv2"
    stages: ClassVar[Optional[str]] = None
    own_stages: ClassVar[tuple[str, ...]] = ()
    has_score: ClassVar[bool] = True  # guidance, inpainting and editing wrap a score
    posthoc_ema: ClassVar[bool] = True  # its training (pipeline.train) keeps the post-hoc EMA's snapshots

    @property
    def reads(self) -> tuple[str, ...]:
        """The method.* keys this family reads: its Params model's."""
        return tuple(self.Params.model_fields)

    def params(self, m: Any) -> FamilyParams:
        """This family's own keys of method.* (m: MethodParams; None: the defaults) as its Params model; a
        ValueError naming each bad key and what is allowed."""
        try:
            return self.Params.model_validate({} if m is None else {key: getattr(m, key) for key in self.reads})
        except ValidationError as err:
            from pipeline.config import messages

            raise ValueError("; ".join(messages(err, prefix="method", root=self.Params))) from None

    # ------------------------------------------------------------------ choices, each refused with what works

    def process_kind(self, sde: str) -> str:
        raise NotImplementedError

    def loss(self, kind: str, loss: str) -> Optional[str]:
        """The registry loss (pipeline.losses) for method.loss; method.loss elbo is the ELBO of the process."""
        if loss == "auto":
            return "dsm"
        if loss == "elbo":
            if kind == "noise_scales":
                raise ValueError("method.loss: elbo is not defined for NCSN's noise scales (no chain to a clean "
                                 "decoder, no SDE); the ELBO exists for method.name ddpm, sohl_dickstein and sde")
            return "vlb" if kind == "discrete_vp" else "huang_elbo"
        return loss

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        if parameterization in ("kernel", "velocity"):
            owner = {"kernel": "a learned mean and variance: Sohl-Dickstein's", "velocity": "flow matching's"}
            raise ValueError(f"method.parameterization: {parameterization} ({owner[parameterization]}) is no score; "
                             f"for method.name: {self.name} use one of score, score_over_sigma, eps, x0, drift")
        if parameterization != "auto":
            return parameterization
        return "drift" if loss == "huang_elbo" else "eps"

    def default_sampler(self, kind: str) -> str:
        if kind == "discrete_vp":
            return "ancestral"
        return "annealed_langevin" if kind == "noise_scales" else "pc"

    def check_distill(self) -> None:
        """distill.method other than none: the consistency model starts from this family's trained network and
        reads x0_hat from it (pipeline.consistency); a family without one refuses."""

    def sampler(self, kind: str, sampler: str) -> str:
        """sample.sampler resolved against the process: what each sampler needs of it."""
        refuse_consistency(sampler)
        if sampler == "auto":
            return self.default_sampler(kind)
        if sampler == "annealed_langevin" and kind != "noise_scales":
            raise ValueError(f"sample.sampler: annealed_langevin walks NCSN's noise scales (method.name ncsn, "
                             f"ncsnv2, or exact_score with method.sde: auto); for {kind} use "
                             f"{_or([s for s in SAMPLERS if s not in ('annealed_langevin', 'consistency')])}")
        if sampler in ("pc", "ode") and kind == "discrete_vp":
            raise ValueError(f"sample.sampler: {sampler} needs an SDE; DDPM's discrete chain has none. "
                             f"Use ancestral, ddim, edm_heun or dpm_solver (they step between the chain's own "
                             f"times), or method.name: sde for the continuous VP SDE")
        if sampler == "ode" and kind == "noise_scales":
            raise ValueError("sample.sampler: ode integrates in continuous time, and NCSN's noise scales are a "
                             "discrete grid. Use edm_heun or dpm_solver (they step between the scales), "
                             "method.name: sde (method.sde: ve is NCSN's continuous limit), or exact_score with "
                             "method.sde vp, ve, subvp or ou")
        return sampler

    def chain_length(self, num_steps: int | str) -> Optional[int]:
        """The discrete chain's length (method.num_steps); None for a family without a chain."""
        return None

    def plan(self, m: Any, scale_by_sigma: bool = True, sampler: str = "auto", likelihood: bool = False) -> Plan:
        """Resolve method.* (m: MethodParams or anything with its attributes) and sample.sampler."""
        self.params(m)  # this family's own keys first: the rules below read them
        kind = self.process_kind(m.sde)
        loss = self.loss(kind, m.loss)
        param = self.parameterization(loss, m.parameterization, scale_by_sigma)
        continuous = kind in CONTINUOUS_KINDS
        if m.weighting == "likelihood" and (loss not in ("dsm", "ism", "ssm") or not continuous):
            # Song et al. 2021 (arXiv:2101.09258) bound the KL with lambda = g^2 for t uniform over an SDE's time;
            # NCSN's scales are drawn uniformly from a geometric grid, so g^2 there is neither that bound nor
            # NCSN's objective.
            raise ValueError(f"method.weighting: likelihood (g^2) weights a score-matching loss (dsm, ism, ssm) over "
                             f"a continuous SDE (method.name: sde); it does not apply to method.name: {self.name} "
                             f"with loss {loss}")
        if m.t_sampling == "importance" and not (kind == "vp" and loss in ("dsm", "ism", "ssm", "huang_elbo")):
            raise ValueError("method.t_sampling: importance (Huang et al.'s q(t) ∝ g^2/std^2) is derived for the VP "
                             "SDE: use method.name: sde, method.sde: vp with method.loss dsm, ism, ssm or elbo")
        if likelihood:
            self.check_likelihood(kind)
        elbo = "discrete" if kind == "discrete_vp" else ("huang" if continuous else None)
        return Plan(kind, loss, param, self.sampler(kind, sampler), continuous, elbo)

    def check_likelihood(self, kind: str) -> None:
        if kind == "noise_scales":
            raise ValueError("eval.likelihood: true needs a model with a likelihood: the probability-flow ODE of an "
                             "SDE (method.name: sde, or exact_score with method.sde vp/ve/subvp/ou) or an ELBO "
                             "(method.name: ddpm, sohl_dickstein); NCSN's noise scales have neither")

    # ------------------------------------------------------------------ rules params validation asks

    def check(self, cfg: Any, plan: Plan) -> None:
        """Every rule of this family against the whole config (cfg: pipeline.config.Config), after `plan`."""
        m, s = cfg.method, cfg.sample
        self.check_owned(m)
        chain = self.chain_length(m.num_steps)
        self.check_sample_steps(plan.process, s.steps, chain, plan.sampler)
        if m.conditional:
            self.check_conditional()
        if s.clip_denoised is True:
            self.check_clip_denoised()
        for key, value, leave in (("data.target", cfg.data.target, "null"), ("sample.direction", s.direction, "forward")):
            if value != {"null": None}.get(leave, leave):
                raise ValueError(f"{key} is for method.name: schrodinger_bridge (a bridge between data.name and "
                                 f"data.target); method.name: {self.name} is a score model from noise (leave "
                                 f"{key}: {leave})")

    def check_owned(self, m: Any) -> None:
        """The method.* keys other families own stay at their defaults: this family never reads them."""
        for key, default in OWNED_KEYS.items():
            if key in self.reads:
                continue
            if getattr(m, key) != default:
                owners = [f.name for f in all_families() if key in f.reads]
                raise ValueError(f"method.{key} is read by method.name {' and '.join(owners)} only; leave it "
                                 f"'{default}' for method.name: {self.name}")
        from families import get

        for key, owner in OWNED_SECTIONS.items():
            if key not in self.reads and getattr(m, key) and get(owner).params(m) != get(owner).params(None):
                raise ValueError(f"method.{key} is for method.name: {owner}; method.name: {self.name} does not read "
                                 f"it (leave method.{key} at its defaults)")

    def check_sample_steps(self, kind: str, steps: int | str, chain: Optional[int], sampler: str) -> None:
        """sample.steps against the process: NCSN's scales fix the grid (except for the few-step samplers, which
        pick among them), a chain bounds it."""
        if steps == "auto":
            return
        if kind == "noise_scales" and sampler not in (*FAST_SAMPLERS, "consistency"):
            raise ValueError(f"sample.steps: NCSN's noise scales fix the grid (noise.num_scales levels); leave "
                             f"sample.steps: auto for method.name: {self.name} (or pick "
                             f"{' or '.join(FAST_SAMPLERS)}, which walk some of the scales)")
        if chain is not None and steps > chain:
            raise ValueError(f"sample.steps ({steps}) must be <= the chain's method.num_steps ({chain})")

    def check_conditional(self) -> None:
        """A class-conditional model (method.conditional) needs a score to guide."""

    def check_clip_denoised(self) -> None:
        """sample.clip_denoised: true needs an x0_hat to clip."""

    def check_data(self, data_name: str) -> None:
        """The data this family can model (pipeline.config asks with data.name)."""

    # ------------------------------------------------------------------ what the stages ask

    def build_process(self, kind: str, m: Any, sigmas: Sequence[float]) -> Process:
        """The forward process of a plan's kind (pipeline.processes.build_process); `sigmas`: NCSN's scales from
        the noise_scales stage, whose range a VE SDE takes."""
        from pipeline.processes import build_process

        return build_process(kind, sigmas=sigmas, num_steps=self.chain_length(m.num_steps), schedule=m.schedule)

    def network_spec(self, spec: dict, m: Any, data: Any) -> tuple[dict, dict]:
        """(spec, loss options) of the network this family trains around `spec` (pipeline.nets), from method.* and
        the training data in model units (a tensor; EDM measures σ_d on it)."""
        return spec, {}

    def loss_options(self, loss: str, m: Any, decoder: Optional[dict] = None) -> dict:
        """The keyword options of the registry loss (pipeline.losses.build_loss) from method.* keys.

        decoder: for 8-bit images, the discretised Gaussian decoder of the discrete ELBO (Ho et al. 2020, eq. (13);
        pipeline.pixels.discrete_decoder), so that L_vlb bounds -log P of the pixels."""
        if loss in ("dsm", "ism", "ssm"):
            return {"weighting": m.weighting, "t_sampling": m.t_sampling}
        if loss == "huang_elbo":
            return {"t_sampling": m.t_sampling}
        if loss == "vlb":
            # A DDPM trained on its ELBO keeps the reverse variance beta: on continuous 2-D data the bound is
            # tight with it and loose with beta_tilde (tests/test_elbo.py measures both).
            return {"variance": "beta", **(decoder or {})}
        return {}

    def sampling_steps(self, process: Process, steps: int | str, sampler: str) -> Optional[int]:
        """sample.steps resolved: 'auto' is the process's own grid (None) or DEFAULT_SDE_STEPS for an SDE; for the
        few-step samplers None, their own default (pipeline.samplers.FAST_DEFAULT_STEPS)."""
        if steps != "auto":
            return int(steps)
        if sampler in FAST_SAMPLERS or sampler == "consistency":
            return None
        return DEFAULT_SDE_STEPS if process.continuous else None

    def reflows(self, m: Any) -> int:
        """How many reflows the distill stage trains on the final model (method.fm.reflow of a flow; 0 else)."""
        return 0

    def stage(self, name: str) -> Optional[Callable]:
        """This family's own body of stage `name`, or None where the score model's body applies."""
        if name not in self.own_stages:
            return None
        return getattr(importlib.import_module(self.stages), f"{name}_stage")


def all_families() -> list[Family]:
    """Every registered family (imports each family's module; for rules that name the owners, docs and tests)."""
    from families import NAMES, get

    return [get(name) for name in NAMES]


class NoiseScaleFamily(Family):
    """A score model on NCSN's geometric noise scales (Song & Ermon 2019, 2020): DSM over the scales, annealed
    Langevin dynamics by default."""

    def process_kind(self, sde: str) -> str:
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: {self.name} (NCSN's noise scales); "
                             f"use method.name: sde with method.sde: {sde}")
        return "noise_scales"

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        if parameterization == "auto":  # NCSNv2 technique 3: s(x, sigma) = s(x) / sigma
            return "score_over_sigma" if scale_by_sigma else "score"
        return super().parameterization(loss, parameterization, scale_by_sigma)


class ChainFamily(Family):
    """A model of a discrete chain of N Gaussian steps with betas (method.schedule, method.num_steps)."""

    Params = ChainParams
    default_chain: ClassVar[int]

    def process_kind(self, sde: str) -> str:
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: {self.name}, which has its own "
                             f"discrete chain (leave method.sde: auto); for a continuous {sde} SDE use "
                             f"method.name: sde")
        return "discrete_vp"

    def chain_length(self, num_steps: int | str) -> Optional[int]:
        return self.default_chain if num_steps == "auto" else int(num_steps)
