"""NCSN (Song & Ermon 2019, arXiv:1907.05600): ten hand-set noise scales from 1 to 0.01 for data in [0, 1],
denoising score matching over them, annealed Langevin dynamics with T = 100 steps per scale."""

from families.base import NoiseScaleFamily


class NCSN(NoiseScaleFamily):
    name = "ncsn"
    paper = "Song & Ermon 2019, Generative modeling by estimating gradients of the data distribution"
    noise_defaults = "ncsn"


FAMILY = NCSN()
