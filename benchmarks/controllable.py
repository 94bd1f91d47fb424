"""Benchmark controllable generation (issue 9): guidance, inpainting, interpolation and editing through the stages.

    python -m benchmarks.controllable [--only STUDY ...] [--out benchmarks/controllable.json]

Studies (each model trains once in its own scratch directory, with the repo's params.yaml plus the overrides
below, then samples and evaluates every variant: the numbers `dvc exp run -S ...` gives for the same keys):

- guidance: a class-conditional DDPM on digits sampled at several classifier-free guidance weights w
  (Ho & Salimans' convention, w = -1 the unconditional model): cond_accuracy, fid, fid_domain, per-class FID;
  also the figure of FID against accuracy (benchmarks/guidance_digits.png).
- inpaint-gmm: the 2-D mixture with the `first` mask on 2,000 test points: the Kolmogorov-Smirnov statistic of
  the probability-integral transform under the exact conditional, for every method with the exact score and with
  a trained VP-SDE model.
- inpaint-digits: the centre box of 500 digits test images (data.n_test = n_reference = 500, n_train 797): FID of the completed
  images against the reference split for every method (DDPM for replace, repaint, mcg; NCSNv2 for langevin).
  The same DDPM then interpolates (DDIM slerp, ancestral NCSNv2 scheme) and edits (SDEdit over t0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.methods import _fmt, track_in_repo, train_and_sample

REPO = Path(__file__).resolve().parents[1]
METHODS_ALL = ["replace", "repaint", "mcg"]
GUIDANCE_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)
GMM_INPAINT = {"task": "inpaint", "n": 2000, "inpaint": {"method": METHODS_ALL}}
DIGITS_500 = {"name": "digits", "n_train": 797, "n_test": 500, "n_reference": 500}  # 1,797 images in all

# study -> [(model name, overrides of params.yaml, {variant: sample overrides})]
STUDIES: dict[str, list[tuple[str, dict, dict[str, dict]]]] = {
    "guidance": [("ddpm-conditional", {"data": {"name": "digits"}, "method": {"name": "ddpm", "conditional": True}},
                  {f"w={w:g}": {"guidance": w} for w in GUIDANCE_WEIGHTS})],
    "inpaint-gmm": [
        ("exact_score-vp", {"data": {"name": "gmm"}, "method": {"name": "exact_score", "sde": "vp"}},
         {"pc": GMM_INPAINT}),
        ("exact_score-ncsn", {"data": {"name": "gmm"}, "method": {"name": "exact_score"}},
         {"annealed_langevin": {"task": "inpaint", "n": 2000, "inpaint": {"method": ["langevin"]}}}),
        ("sde-vp", {"data": {"name": "gmm"}, "method": {"name": "sde", "sde": "vp"}}, {"pc": GMM_INPAINT}),
        ("ncsnv2", {"data": {"name": "gmm"}, "method": {"name": "ncsnv2"}},
         {"annealed_langevin": {"task": "inpaint", "n": 2000, "inpaint": {"method": ["langevin", "replace"]}}}),
    ],
    "inpaint-digits": [
        # Cut to fit the 2-core CPU beside other work: 600 training steps (the digits default is 2,000) and DDPM's chain
        # strided to 100 steps (RePaint's own schedule is T = 250 with j = 10, r = 10: ~2,400 steps on 500 images).
        ("ddpm", {"data": DIGITS_500, "method": {"name": "ddpm"}, "train": {"steps": 600}}, {
            "ancestral-100": {"task": "inpaint", "steps": 100, "inpaint": {"method": METHODS_ALL}},
            # the same model for the other tasks
            "interpolate ddim-50": {"task": "interpolate", "sampler": "ddim", "steps": 50},
            "edit ddim-50": {"task": "edit", "sampler": "ddim", "steps": 50},
            "ancestral-100 alpha=0.5": {"task": "inpaint", "steps": 100, "inpaint": {"method": ["mcg"], "alpha": 0.5}},
        }),
        ("ncsnv2", {"data": DIGITS_500, "method": {"name": "ncsnv2"}, "train": {"steps": 600}},
         {"annealed_langevin": {"task": "inpaint", "inpaint": {"method": ["langevin", "replace"]}}}),
    ],
}


def run_study(study: str, scratch: Path) -> list[dict[str, Any]]:
    """Every model of the study: all stages with its first variant, then sample and evaluate for the others."""
    rows = [{"study": study, **row} for row in train_and_sample(STUDIES[study], scratch / study)]
    if study == "guidance":  # keep the figure's inputs
        weights = {variant: sample["guidance"] for _, _, variants in STUDIES[study]
                   for variant, sample in variants.items()}
        for row in rows:
            row["w"] = weights[row["sampler"]]
    return rows


def guidance_table(rows: list[dict[str, Any]]) -> str:
    head = ("| w | cond_accuracy | fid (floor) | fid_domain (floor) | kid | mean per-class fid (floor) | nfe |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['w']:g} | {_fmt(r.get('cond_accuracy'), 3)} | {_fmt(r['fid'], 2)} ({_fmt(r['fid_floor'], 2)}) | "
             f"{_fmt(r['fid_domain'], 2)} ({_fmt(r['fid_domain_floor'], 2)}) | {_fmt(r['kid'], 4)} | "
             f"{_fmt(r.get('fid_class_mean'), 2)} ({_fmt(r.get('fid_class_mean_floor'), 2)}) | {r['nfe']} |"
             for r in sorted(rows, key=lambda r: r["w"])]
    return head + "\n".join(lines)


def inpaint_table(rows: list[dict[str, Any]], metric: str, digits: int) -> str:
    """One line per model and method: `metric`_<method>, the RMS error on the generated part and the nfe."""
    head = f"| model | sampler | method | {metric} | rmse (generated part) | nfe |\n|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        for key in r:
            if key.startswith(f"{metric}_") and key != f"{metric}_critical" and not key.startswith("fid_domain"):
                method = key.removeprefix(f"{metric}_")
                if method in ("floor", "n", "mode", "reference", "weights", "impl"):
                    continue
                lines.append(f"| {r['model']} | {r['sampler']} | {method} | {_fmt(r[key], digits)} | "
                             f"{_fmt(r.get(f'rmse_{method}'), 4)} | {r.get(f'nfe_{method}', r['nfe'])} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(STUDIES), help="studies to run (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "controllable.json"))
    args = parser.parse_args()
    track_in_repo()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    with tempfile.TemporaryDirectory(prefix="bench-controllable-") as scratch:
        for study in args.only or list(STUDIES):
            rows = [r for r in rows if r["study"] != study] + run_study(study, Path(scratch))
            out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as it comes: a long run may be stopped
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    """Print the tables (docs/benchmarks.md) of the studies in `rows` and draw the guidance figure."""
    from pipeline import plots

    guided = [r for r in rows if r["study"] == "guidance"]
    if guided:
        print(guidance_table(guided))
        ordered = sorted(guided, key=lambda r: r["w"])
        plots.guidance_tradeoff(REPO / "benchmarks" / "guidance_digits.png", [r["w"] for r in ordered],
                                [r["fid_domain"] for r in ordered], [r["cond_accuracy"] for r in ordered],
                                "digits, class-conditional DDPM: guidance weight w", fid_name="fid_domain")
    for study, metric, digits in (("inpaint-gmm", "ks", 3), ("inpaint-digits", "fid", 2)):
        chosen = [r for r in rows if r["study"] == study]
        if chosen:
            print(inpaint_table(chosen, metric, digits))
    for r in rows:
        if r["sampler"].startswith(("interpolate", "edit")):
            print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
