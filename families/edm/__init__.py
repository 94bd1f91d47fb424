"""EDM (Karras et al. 2022, arXiv:2206.00364): the process x0 + sigma z with log-normal training sigma, the network
preconditioned to output x0 (c_skip x + c_out F), their weighted denoising loss, Heun's sampler on the rho-schedule."""

from typing import Any, Callable, Literal, Optional, Sequence, Union

from pydantic import field_validator

from families import OWNED_KEYS
from families.base import Family, FamilyParams

# EDM's noise levels and training distribution (Karras et al. 2022, Table 1, "Ours").
EDM_PROCESS = {"sigma_min": 0.002, "sigma_max": 80.0, "p_mean": -1.2, "p_std": 1.2}


def sigma_data_of(sigma_data: float | str, x) -> float:
    """EDM's σ_d: method.sigma_data, or with 'auto' the std of every coordinate of the training data x (a tensor in
    the model's units: images after pixel scaling), as Karras et al. set 0.5 for CIFAR-10 in [-1, 1]."""
    if sigma_data != "auto":
        return float(sigma_data)
    value = float(x.double().std())
    if not value > 0:
        raise ValueError("method.sigma_data: auto needs training data that are not all equal (their std is 0); "
                         "set method.sigma_data")
    return value


class EDMParams(FamilyParams):
    """method.sigma_data: EDM's σ_d, the data's standard deviation in the preconditioning and the loss weight
    (Karras et al. 2022, Table 1); auto: measured on the training data (sigma_data_of)."""

    sigma_data: Union[Literal["auto"], float] = OWNED_KEYS["sigma_data"]

    @field_validator("sigma_data")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v


class EDM(Family):
    name = "edm"
    paper = "Karras et al. 2022, Elucidating the design space of diffusion-based generative models"
    Params = EDMParams

    def process_kind(self, sde: str) -> str:
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: edm, which has its own process "
                             f"x0 + sigma z (leave method.sde: auto); for the {sde} SDE use method.name: sde")
        return "edm"

    def loss(self, kind: str, loss: str) -> Optional[str]:
        if loss != "auto":
            raise ValueError(f"method.name: edm trains on its own loss (Karras et al.'s weighted denoising loss with "
                             f"log-normal sigma); leave method.loss: auto, got {loss}")
        return "edm"

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        super().parameterization(loss, parameterization, scale_by_sigma)  # kernel is refused there
        if parameterization not in ("auto", "x0"):
            raise ValueError(f"method.name: edm's preconditioned network outputs the denoised x0 (c_skip x + c_out F); "
                             f"leave method.parameterization: auto (or x0), got {parameterization}")
        return "x0"

    def default_sampler(self, kind: str) -> str:
        return "edm_heun"

    def build_process(self, kind: str, m: Any, sigmas: Sequence[float]):
        from pipeline.processes import EDMProcess

        return EDMProcess(**EDM_PROCESS)

    def network_spec(self, spec: dict, m: Any, data: Callable) -> tuple[dict, dict]:
        """The preconditioning wraps the network (pipeline.nets.edm), with σ_d from the training data in model units
        (`data()`, a tensor) unless method.sigma_data sets it; the loss takes the same σ_d."""
        from pipeline.defaults import edm_spec

        sigma_data = sigma_data_of(m.sigma_data, data())
        return edm_spec(spec, sigma_data), {"sigma_data": sigma_data}


FAMILY = EDM()
