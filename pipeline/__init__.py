"""Score-based generative modelling pipeline: the library behind the DVC stages."""
