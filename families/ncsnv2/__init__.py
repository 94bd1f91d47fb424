"""NCSNv2 (Song & Ermon 2020, arXiv:2006.09011): NCSN's scales chosen by techniques 1, 2 and 4 from the data, the
score scaled by 1/sigma (technique 3), EMA (technique 5); annealed Langevin dynamics."""

from families.base import NoiseScaleFamily


class NCSNv2(NoiseScaleFamily):
    name = "ncsnv2"
    paper = "Song & Ermon 2020, Improved techniques for training score-based generative models"
    noise_defaults = "ncsnv2"


FAMILY = NCSNv2()
