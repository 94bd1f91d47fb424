"""Analytic oracles shared by the tests (pytest puts tests/ on sys.path: `from oracles import ...`)."""

from __future__ import annotations

from pipeline.processes import append_dims


def gaussian_score(process, mu=0.5, c=0.8):
    """The exact score of N(mu, c^2 I) data pushed through the process, for any shape (B, *D):
    -(x - m mu) / (m^2 c^2 + s^2) with (m, s) = process.marginal(t)."""

    def score_fn(x, t):
        m, s = process.marginal(t)
        m, s = append_dims(m, x.ndim).to(x.dtype), append_dims(s, x.ndim).to(x.dtype)
        return -(x - m * mu) / (m**2 * c**2 + s**2)

    return score_fn
