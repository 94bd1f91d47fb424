"""Benchmark linear inverse problems (issue 23): the exact posterior check and real data through the stages.

    python -m benchmarks.inverse [--only STUDY ...] [--out benchmarks/inverse.json]

Studies:

- oracle: the library alone (pipeline.inverse.solve) with the exact score of tests/test_inverse.py's 2-D mixture,
  A = [[1, 1]], 2,000 measurements, 500 PC steps: the Kolmogorov-Smirnov statistic of the PIT along A's null
  space under the exact posterior and the mean |A x - y|, per method, noiseless and with sigma_y = 0.5.
- gmm-trained: a VP-SDE model trained on the same mixture through the stages (the repo's params.yaml otherwise),
  then sample.task: inverse on 2,000 test points with every method that applies, noiseless and noisy.
- sr-digits: a DDPM trained on digits (its defaults), then x2 super-resolution (2 x 2 means) of 300 test images by
  replace, mcg and dps, 100 ancestral steps: rmse, consistency, FID against the reference split (and its floor).
- colorize-photos: a DDPM trained on data.name photos (its defaults), then colourisation of 500 test crops by the
  same methods: the same, and colourfulness against the reference's.

Each model trains once in its own scratch directory with the overrides below; the numbers are those `dvc exp run
-S ...` gives for the same keys.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.methods import _fmt, track_in_repo, train_and_sample

REPO = Path(__file__).resolve().parents[1]
# x0 + x1 tells the components apart; they differ along the unseen x0 - x1 (tests/test_inverse.py's mixture)
MIX = {"weights": [0.4, 0.6], "means": [[3.0, -1.0], [-3.0, -1.0]],
       "covs": [[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 1.0]]]}
SUM = [[1.0, 1.0]]
GMM = {"name": "gmm", "gmm": MIX}
ORACLE = [  # (method, noise, PC corrector, method options)
    ("replace", 0.0, "langevin", {}), ("replace", 0.0, "none", {}),
    ("repaint", 0.0, "none", dict(jump=10, resamples=5)), ("mcg", 0.0, "langevin", dict(alpha=0.01)),
    ("dps", 0.0, "none", dict(zeta=0.05)), ("mcg", 0.5, "langevin", dict(alpha=0.01)),
    ("dps", 0.5, "none", dict(zeta=0.05)), ("dps", 0.5, "none", dict(zeta=0.2)), ("dps", 0.5, "none", dict(zeta=1.0)),
]
IMAGE_METHODS = ["replace", "mcg", "dps"]


def _inverse(operator: dict, methods: list[str], n: int | str = "auto", **sample) -> dict:
    return {"task": "inverse", "n": n, "inverse": {**operator, "method": methods}, **sample}


# study -> [(model name, overrides of params.yaml, {variant: sample overrides})]
STUDIES: dict[str, list[tuple[str, dict, dict[str, dict]]]] = {
    # 500 PC steps (the oracle's; the VP default is 1,000), RePaint with 3 resamplings (~1,400 steps on 2,000 points)
    "gmm-trained": [("sde-vp", {"data": GMM, "method": {"name": "sde", "sde": "vp"}}, {
        "pc-500 noiseless": _inverse({"operator": "matrix", "matrix": SUM, "resamples": 3},
                                     ["replace", "repaint", "mcg", "dps"], 2000, sampler="pc", steps=500),
        "pc-500 noise 0.5": _inverse({"operator": "matrix", "matrix": SUM, "noise": 0.5}, ["mcg", "dps"], 2000,
                                     sampler="pc", steps=500)})],
    # DDPM's chain strided to 100 ancestral steps, as benchmarks.controllable's inpainting on digits
    "sr-digits": [("ddpm", {"data": {"name": "digits"}, "method": {"name": "ddpm"}}, {
        "ancestral-100 x2": _inverse({"operator": "downsample", "factor": 2}, IMAGE_METHODS, steps=100)})],
    "colorize-photos": [("ddpm", {"data": {"name": "photos"}, "method": {"name": "ddpm"}}, {
        "ancestral-100": _inverse({"operator": "colorize"}, IMAGE_METHODS, steps=100),
        # DPS's step on images is set by hand (defaults.DPS_ZETA): one larger step beside it, reported, not tuned
        "ancestral-100 zeta 2": _inverse({"operator": "colorize", "zeta": 2.0}, ["dps"], steps=100)})],
}


def oracle_rows() -> list[dict[str, Any]]:
    """The library's exact check, one row per ORACLE entry."""
    import time

    import torch
    from scipy import stats

    from pipeline.gmm import GaussianMixture
    from pipeline.inverse import Matrix, gmm_posterior_cdf, measure, solve
    from pipeline.models import exact_score_fn
    from pipeline.processes import VPSDE

    base = dict(denoise=True, variance="beta_tilde", eta=0.0, predictor="reverse_diffusion", snr=0.16,
                corrector_steps=1, lam=0.0, ode_method="euler", rtol=1e-5, atol=1e-5, step_size=1e-3,
                steps_per_scale=3)
    g, op, vp, n = GaussianMixture.from_params(**MIX), Matrix(SUM), VPSDE(), 2000
    x_true = g.sample(n, torch.Generator().manual_seed(1))
    rows = []
    for method, noise, corrector, options in ORACLE:
        y = measure(op, x_true, noise, torch.Generator().manual_seed(2))
        start = time.perf_counter()
        out = solve("pc", "score", exact_score_fn(g, vp), vp, op, y, (n, 2), torch.Generator().manual_seed(0), 500,
                    {**base, "corrector": corrector}, method, noise=noise, **options)
        pit = gmm_posterior_cdf(g, op.matrix, y, noise, out.x, op.null_direction())
        rows.append({"study": "oracle", "model": "exact_score-vp", "method": method, "noise": noise,
                     "corrector": corrector, **options, "ks": float(stats.kstest(pit.numpy(), "uniform").statistic),
                     "ks_critical": float(stats.kstwo.ppf(0.95, n)),
                     "consistency": float((op(out.x) - y).abs().mean()), "nfe": out.nfe,
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_study(study: str, scratch: Path) -> list[dict[str, Any]]:
    """Every model of the study: all stages with its first variant, then sample and evaluate for the others."""
    if study == "oracle":
        return oracle_rows()
    return [{"study": study, **row} for row in train_and_sample(STUDIES[study], scratch / study)]


def _methods(row: dict[str, Any]) -> list[str]:
    return [k.removeprefix("rmse_") for k in row if k.startswith("rmse_")]


def table(rows: list[dict[str, Any]]) -> str:
    """One line per study, variant and method: KS or FID (floor), rmse, consistency, colourfulness, nfe."""
    head = ("| study | variant | method | ks (5 % critical) | fid (floor) | rmse | consistency, max (noise) | "
            "colourfulness (reference) | nfe |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["study"] == "oracle":
            extra = ", ".join(f"{k} {r[k]}" for k in ("alpha", "zeta", "jump", "resamples") if k in r)
            variant = f"noise {r['noise']:g}, corrector {r['corrector']}" + (f", {extra}" if extra else "")
            lines.append(f"| oracle (exact score) | {variant} | {r['method']} | {_fmt(r['ks'], 3)} "
                         f"({_fmt(r['ks_critical'], 3)}) | – | – | {_fmt(r['consistency'], 4)} (mean abs) | – | "
                         f"{r['nfe']} |")
            continue
        for m in _methods(r):
            ks = f"{_fmt(r[f'ks_{m}'], 3)} ({_fmt(r['ks_critical'], 3)})" if f"ks_{m}" in r else "–"
            fid = f"{_fmt(r[f'fid_{m}'], 2)} ({_fmt(r['fid_floor'], 2)})" if f"fid_{m}" in r else "–"
            colour = (f"{_fmt(r[f'colourfulness_{m}'], 1)} ({_fmt(r['colourfulness_reference'], 1)})"
                      if f"colourfulness_{m}" in r else "–")
            lines.append(f"| {r['study']} | {r['sampler']} | {m} | {ks} | {fid} | {_fmt(r[f'rmse_{m}'], 4)} | "
                         f"{_fmt(r[f'consistency_{m}'], 4)}, {_fmt(r.get(f'consistency_max_{m}'), 4)} "
                         f"({_fmt(r['measurement_noise'], 3)}) | {colour} | "
                         f"{r.get(f'nfe_{m}', r['nfe'])} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = ["oracle", *STUDIES]
    parser.add_argument("--only", nargs="*", choices=studies, help="studies to run (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "inverse.json"))
    args = parser.parse_args()
    track_in_repo()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    with tempfile.TemporaryDirectory(prefix="bench-inverse-") as scratch:
        for study in args.only or studies:
            rows = [r for r in rows if r["study"] != study] + run_study(study, Path(scratch))
            out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as it comes: a long run may be stopped
    print(table(rows))


if __name__ == "__main__":
    main()
