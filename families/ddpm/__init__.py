"""DDPM (Ho et al. 2020, arXiv:2006.11239): a chain of N = 1000 steps with linear betas, L_simple (eps MSE),
ancestral sampling (DDIM, Song et al. 2021a, strides the chain)."""

from typing import Optional

from families.base import ChainFamily


class DDPM(ChainFamily):
    name = "ddpm"
    paper = "Ho et al. 2020, Denoising diffusion probabilistic models"
    default_chain = 1000

    def loss(self, kind: str, loss: str) -> Optional[str]:
        return "eps_mse" if loss == "auto" else super().loss(kind, loss)

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        if parameterization == "drift":
            raise ValueError("method.parameterization: drift (Huang's a = g s) needs an SDE; DDPM's chain has none. "
                             "Use method.name: sde, or eps / x0 / score for ddpm")
        return super().parameterization(loss, parameterization, scale_by_sigma)


FAMILY = DDPM()
