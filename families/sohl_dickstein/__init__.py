"""Sohl-Dickstein et al. 2015 (arXiv:1503.03585): a chain of T = 40 steps whose reverse kernels' means and variances
are learned on the ELBO, sampled ancestrally with those kernels."""

from typing import Optional

from families.base import ChainFamily


class SohlDickstein(ChainFamily):
    name = "sohl_dickstein"
    paper = "Sohl-Dickstein et al. 2015, Deep unsupervised learning using nonequilibrium thermodynamics"
    default_chain = 40
    has_score = False

    def loss(self, kind: str, loss: str) -> Optional[str]:
        if loss not in ("auto", "elbo"):
            raise ValueError(f"method.name: sohl_dickstein is trained on its ELBO only (method.loss: auto or elbo), "
                             f"got method.loss: {loss}")
        return "vlb"

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        if parameterization not in ("auto", "kernel"):
            raise ValueError(f"method.name: sohl_dickstein learns the reverse kernel's mean and variance "
                             f"(method.parameterization: auto or kernel), got {parameterization}")
        return "kernel"

    def sampler(self, kind: str, sampler: str) -> str:
        if sampler not in ("auto", "ancestral"):
            raise ValueError(f"sample.sampler: {sampler} needs a score; Sohl-Dickstein's model is a reverse kernel, "
                             f"sampled with sample.sampler: ancestral (or auto)")
        return "ancestral"

    def check_sample_steps(self, kind: str, steps, chain, sampler: str) -> None:
        if steps != "auto":
            raise ValueError("sample.steps: Sohl-Dickstein's learned kernels exist only for the chain's own steps; "
                             "leave sample.steps: auto (method.num_steps sets the chain)")

    def check_distill(self) -> None:
        raise ValueError("distill.method: a consistency model reads x0_hat from its teacher, and Sohl-Dickstein's "
                         "learned kernels predict none; distil from ddpm, sde, edm, ncsnv2 or flow_matching")

    def check_conditional(self) -> None:
        raise ValueError("method.conditional: Sohl-Dickstein's learned kernels have no score to guide; use "
                         "method.name ddpm, sde, ncsnv2, ncsn (or exact_score on gmm)")

    def check_clip_denoised(self) -> None:
        raise ValueError("sample.clip_denoised: Sohl-Dickstein's learned kernels predict no x0_hat to clip; "
                         "leave sample.clip_denoised: auto or false")


FAMILY = SohlDickstein()
