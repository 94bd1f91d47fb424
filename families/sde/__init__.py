"""Score SDEs (Song et al. 2021, arXiv:2011.13456): VP, VE, sub-VP (and OU) SDEs, denoising score matching (or
Huang et al. 2021's ELBO), predictor-corrector sampling by default, the probability-flow ODE and its likelihood."""

from families.base import Family, SdeParams


class ScoreSDE(Family):
    name = "sde"
    paper = "Song et al. 2021, Score-based generative modeling through stochastic differential equations"
    Params = SdeParams

    def process_kind(self, sde: str) -> str:
        return "vp" if sde == "auto" else sde


FAMILY = ScoreSDE()
