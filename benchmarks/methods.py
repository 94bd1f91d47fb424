"""Benchmark every method: cd, emd, nll, nfe and wall time per stage; prints a markdown table.

    python -m benchmarks.methods [--only NAME ...] [--out benchmarks/results.json]

Each model runs the pipeline's stages in-process in its own scratch directory, with the repo's
params.yaml plus the model's overrides: the numbers `dvc exp run -S ...` gives for the same keys.
A model's further sampler variants re-run only sample and evaluate on the same trained model.
Swiss roll for every method; on gmm data the VP SDE's ODE nll against the true nll and Huang's
ELBO with uniform against importance-sampled time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from stages.common import STAGE_BODIES

REPO = Path(__file__).resolve().parents[1]
LIKELIHOOD = {"eval": {"likelihood": True}}

# name -> (overrides of params.yaml, {variant: sample overrides}); the first variant is the default sampler.
MODELS: dict[str, tuple[dict, dict[str, dict]]] = {
    "ncsnv2": ({}, {"annealed_langevin": {}}),
    "ddpm": ({"method": {"name": "ddpm"}, **LIKELIHOOD},
             {"ancestral-1000": {}, "ddim-50": {"sampler": "ddim", "steps": 50}}),
    "sde-vp": ({"method": {"name": "sde", "sde": "vp"}, **LIKELIHOOD},
               {"pc-1000": {}, "ode-rk45": {"sampler": "ode"}, "ddim-50": {"sampler": "ddim", "steps": 50}}),
    "sde-subvp": ({"method": {"name": "sde", "sde": "subvp"}, **LIKELIHOOD}, {"pc-1000": {}}),
    "sde-ve": ({"method": {"name": "sde", "sde": "ve"}, **LIKELIHOOD}, {"pc-1000": {}}),
    "sohl_dickstein": ({"method": {"name": "sohl_dickstein"}, **LIKELIHOOD}, {"ancestral-40": {}}),
    "edm": ({"method": {"name": "edm"}, **LIKELIHOOD},
            {"edm_heun-18": {}, "dpm_solver-20": {"sampler": "dpm_solver", "steps": 20}}),
    "gmm-sde-vp": ({"data": {"name": "gmm"}, "method": {"name": "sde", "sde": "vp"}, **LIKELIHOOD}, {"pc-1000": {}}),
}


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _run_stages(names: list[str]) -> dict[str, float]:
    from stages.common import run_named

    seconds = {}
    for name in names:
        start = time.perf_counter()
        if run_named(name, ["--params", "params.yaml"]) != 0:
            raise RuntimeError(f"stage {name} failed")
        seconds[name] = time.perf_counter() - start
    return seconds


def run_model(name: str, scratch: Path) -> list[dict[str, Any]]:
    """Train one model, then sample and evaluate each of its variants; one result row per variant."""
    overrides, variants = MODELS[name]
    return train_and_sample([(name, overrides, variants)], scratch)


def train_and_sample(models: list[tuple[str, dict, dict[str, dict]]], scratch: Path) -> list[dict[str, Any]]:
    """Each (name, overrides of params.yaml, {variant: sample overrides}) in its own folder under scratch: every
    stage with its first variant, then sample, evaluate and report for the others; one row per variant."""
    rows = []
    for name, overrides, variants in models:
        base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
        work = scratch / name
        work.mkdir(parents=True)
        os.chdir(work)
        try:
            rows += run_variants(name, base, variants, list(STAGE_BODIES))
        finally:
            os.chdir(REPO)
    return rows


def run_variants(name: str, base: dict, variants: dict[str, dict], first: list[str]) -> list[dict[str, Any]]:
    """In the current directory: the `first` stages with the first variant's sample keys, then sample and
    evaluate for each further variant; one result row per variant (printed as it comes)."""
    rows = []
    base = _merge(base, {"tracking": {"experiment": BENCH_EXPERIMENT}})
    for i, (variant, sample) in enumerate(variants.items()):
        Path("params.yaml").write_text(yaml.safe_dump(_merge(base, {"sample": sample}), sort_keys=False))
        os.environ["DVC_EXP_NAME"] = f"bench-{name}-{variant}"  # its MLflow parent run: one per variant
        stages = first if i == 0 else ["sample", "evaluate", "report"]
        seconds = _run_stages(stages)
        metrics = json.loads(Path("metrics/evaluate.json").read_text())
        sample = json.loads(Path("metrics/sample.json").read_text())
        nfes = {k: v for k, v in sample.items() if k.startswith("nfe")}  # nfe, and per method or t0 of a task
        rows.append({"model": name, "sampler": variant, **nfes, **metrics,
                     "train_s": seconds.get("train"), "sample_s": seconds["sample"], "evaluate_s": seconds["evaluate"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# The MLflow experiment of the benchmarks' runs in the repo's store (`make compare` reads them).
BENCH_EXPERIMENT = "benchmarks"


def track_in_repo() -> None:
    """Log every benchmark run to this repo's MLflow store (or MLFLOW_TRACKING_URI when set), in the experiment
    `benchmarks`, before the stage returns: the stages run in scratch folders, and the comparison
    (`python -m stages.compare`) reads the runs from the store. Per-variant names come from DVC_EXP_NAME."""
    os.environ["DVC_ROOT"] = str(REPO)  # the store, the artifacts and the git commit are the repo's
    os.environ["SCORE_PIPELINE_TRACKING"] = "sync"  # no replay process beside the timed stages


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md: one line per model and sampler."""
    head = ("| model | sampler | cd (floor) | emd (floor) | nll | elbo_nll | nfe | train s | sample s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        nll = f"{_fmt(r.get('nll'), 3)} ± {_fmt(r.get('nll_se'), 3)}" if "nll" in r else "–"
        elbo = f"{_fmt(r.get('elbo_nll'), 3)} ± {_fmt(r.get('elbo_nll_se'), 3)}" if "elbo_nll" in r else "–"
        lines.append(f"| {r['model']} | {r['sampler']} | {_fmt(r['cd'])} ({_fmt(r['cd_floor'])}) | "
                     f"{_fmt(r['emd'])} ({_fmt(r['emd_floor'])}) | {nll} | {elbo} | {r['nfe']} | "
                     f"{_fmt(r['train_s'], 0)} | {_fmt(r['sample_s'], 0)} |")
    return head + "\n".join(lines)


def bench_parser(doc: str, models: list[str], out: str) -> argparse.ArgumentParser:
    """The arguments every stage benchmark takes: --only (some of `models`) and --out (its rows, JSON)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=models, help="models to run (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / out), help="where to write the rows")
    return parser


def run_models(run: Callable[[str, Path], list[dict[str, Any]]], names: list[str]) -> list[dict[str, Any]]:
    """run(name, scratch) for each model, logged to this repo's MLflow store, in a scratch folder removed after."""
    track_in_repo()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        for name in names:
            rows.extend(run(name, Path(scratch)))
        os.chdir(REPO)
    return rows


def main() -> None:
    args = bench_parser(__doc__, list(MODELS), "results.json").parse_args()
    rows = run_models(run_model, args.only or list(MODELS))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    for r in rows:
        if "nll_true_subset" in r:
            print(f"\n{r['model']}: nll {r.get('nll'):.4f} vs true {r['nll_true_subset']:.4f} "
                  f"(gap {r.get('nll_gap'):+.4f} nats/dim); Huang ELBO uniform {r.get('elbo_nll'):.4f} "
                  f"± {r.get('elbo_nll_se'):.4f}, importance {r.get('elbo_nll_importance'):.4f} "
                  f"± {r.get('elbo_nll_importance_se'):.4f}")


if __name__ == "__main__":
    main()
