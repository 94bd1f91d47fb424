"""Samplers: steps of the form step(x, t_cur, t_next, score_fn, generator) over a float64 grid."""
