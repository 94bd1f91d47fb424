"""Flow matching (Lipman et al. 2023, arXiv:2210.02747) and rectified flow (Liu et al. 2023, arXiv:2209.03003): a
network regresses the velocity of the linear path between data and N(0, I) (pipeline.processes.LinearPath), with
noise paired to data independently or by minibatch optimal transport (Tong et al. 2023, arXiv:2302.00482); samples
and likelihoods come from the ODE of that velocity (Euler, Heun, RK45, DPM-Solver++ on its data prediction)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from families.base import Family, FamilyParams, Plan, refuse_consistency
from pipeline.config import auto_or_at_least
from pipeline.names import COUPLINGS, VELOCITY_SAMPLERS

# The tasks that only draw from the prior and walk the ODE; the others wrap a score.
TASKS = ("generate", "interpolate")


class FlowParams(BaseModel):
    """method.fm: the path's σ_min (0: rectified flow), the coupling of noise and data in a batch, and the number of
    reflows (Liu et al. 2023) with the pairs each draws from the flow before it (auto: as many as training data)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sigma_min: float = Field(0.0, ge=0.0, lt=1.0)
    coupling: Literal[COUPLINGS] = "independent"
    reflow: int = Field(0, ge=0)
    pairs: Union[Literal["auto"], int] = "auto"

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v):
        return auto_or_at_least(v, 1)


class FlowMatchingParams(FamilyParams):
    """The family's own method.* keys: its section method.fm."""

    fm: FlowParams = Field(default_factory=FlowParams)


class FlowMatching(Family):
    name = "flow_matching"
    paper = "Lipman et al. 2023, Flow matching for generative modeling; Liu et al. 2023, Flow straight and fast"
    Params = FlowMatchingParams
    has_score = False

    def fm(self, m: Any) -> FlowParams:
        """method.fm of `m` (MethodParams; None: the defaults) as FlowParams."""
        return self.params(m).fm

    def process_kind(self, sde: str) -> str:
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: flow_matching, whose path is the "
                             f"linear one between data and noise (method.fm.sigma_min); leave method.sde: auto")
        return "linear_path"

    def loss(self, kind: str, loss: str) -> Optional[str]:
        if loss != "auto":
            raise ValueError(f"method.name: flow_matching trains on its own velocity regression (Lipman et al.'s "
                             f"conditional flow matching); leave method.loss: auto, got {loss}")
        return "flow_matching"

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        if parameterization not in ("auto", "velocity"):
            raise ValueError(f"method.name: flow_matching's network outputs the velocity; leave "
                             f"method.parameterization: auto (or velocity), got {parameterization}")
        return "velocity"

    def default_sampler(self, kind: str) -> str:
        return "ode"

    def sampler(self, kind: str, sampler: str) -> str:
        refuse_consistency(sampler)
        if sampler == "auto":
            return self.default_sampler(kind)
        if sampler not in VELOCITY_SAMPLERS:
            raise ValueError(f"sample.sampler: {sampler} steps with a score, which the linear path's velocity gives "
                             f"only where m = 1 − t > 0; flow matching walks its ODE: sample.sampler ode "
                             f"(sample.ode_method rk45, euler or heun) or dpm_solver")
        return sampler

    def plan(self, m: Any, scale_by_sigma: bool = True, sampler: str = "auto", likelihood: bool = False) -> Plan:
        """The score model's plan, with the ODE likelihood (the velocity's change of variables) and no ELBO."""
        return replace(super().plan(m, scale_by_sigma, sampler, likelihood), ode=True, elbo=None)

    def check_likelihood(self, kind: str) -> None:
        """The ODE likelihood exists for every flow."""

    def check_conditional(self) -> None:
        raise ValueError("method.conditional: guidance steers a score, and flow matching learns a velocity; leave "
                         "method.conditional: false for method.name: flow_matching")

    def check_clip_denoised(self) -> None:
        raise ValueError("sample.clip_denoised clips a score model's x0_hat; flow matching's ODE walks its velocity "
                         "(leave sample.clip_denoised: auto or false)")

    def check(self, cfg: Any, plan: Plan) -> None:
        super().check(cfg, plan)
        if cfg.sample.task not in TASKS:
            raise ValueError(f"sample.task: {cfg.sample.task} wraps a score model's sampler step; method.name: "
                             f"flow_matching draws with {' or '.join(TASKS)}")

    def sampling_steps(self, process, steps: int | str, sampler: str) -> Optional[int]:
        """sample.steps: 'auto' is the sampler's own default (the fixed-step ODE's 100, DPM-Solver's 20)."""
        return None if steps == "auto" else int(steps)

    def build_process(self, kind: str, m: Any, sigmas: Sequence[float]):
        from pipeline.processes import LinearPath

        return LinearPath(self.fm(m).sigma_min)

    def loss_options(self, loss: str, m: Any, decoder: Optional[dict] = None) -> dict:
        return {"coupling": self.fm(m).coupling}

    def reflows(self, m: Any) -> int:
        return self.fm(m).reflow

    def reflow_pairs(self, m: Any, n_train: int) -> int:
        """method.fm.pairs: auto draws as many pairs as there are training examples."""
        pairs = self.fm(m).pairs
        return n_train if pairs == "auto" else int(pairs)


FAMILY = FlowMatching()
