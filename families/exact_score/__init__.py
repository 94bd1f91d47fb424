"""The exact score of a Gaussian mixture (data.name: gmm): no network and no training, the analytic score on NCSN's
scales or any SDE's marginals; the oracle every sampler is checked against."""

from typing import Optional

from families.base import Family, SdeParams


class ExactScore(Family):
    name = "exact_score"
    paper = "the analytic score of a Gaussian mixture under each process's Gaussian marginals"
    Params = SdeParams
    noise_defaults = "exact_score"
    stages = "families.exact_score.stages"
    own_stages = ("train",)
    posthoc_ema = False

    def process_kind(self, sde: str) -> str:
        return "noise_scales" if sde == "auto" else sde

    def loss(self, kind: str, loss: str) -> Optional[str]:
        if loss != "auto":
            raise ValueError("method.name: exact_score trains nothing (the score is analytic); leave method.loss: auto")
        return None

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        super().parameterization(loss, parameterization, scale_by_sigma)  # kernel is refused there
        if parameterization != "auto":
            raise ValueError("method.name: exact_score has no network (the score is analytic); leave "
                             "method.parameterization: auto")
        return "score"

    def check_distill(self) -> None:
        raise ValueError("distill.method: a consistency model starts from the trained network of its teacher, and "
                         "method.name: exact_score has none (the score is analytic); distil from ddpm, sde, edm, "
                         "ncsnv2 or flow_matching")

    def check_data(self, data_name: str) -> None:
        if data_name != "gmm":
            raise ValueError(f"method.name: exact_score needs data.name: gmm (the analytic score is known only for a "
                             f"Gaussian mixture); got data.name: {data_name}. Train a model for {data_name}: "
                             f"method.name ncsnv2, ncsn, ddpm, sde or sohl_dickstein.")


FAMILY = ExactScore()
