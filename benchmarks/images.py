"""Benchmark every method on images: fid, fid_domain, kid, bits/dim, nfe and wall time; prints a markdown table.

    python -m benchmarks.images [--data digits] [--only NAME ...] [--out benchmarks/images_digits.json]

Each model runs the pipeline's stages in-process in its own scratch directory, with the repo's
params.yaml plus `data.name` and the model's overrides: the numbers `dvc exp run -S data.name=digits
-S ...` gives for the same keys. The reference stages (Inception features of the test and reference
images, the fid_domain classifier) run once and are copied to every model, as DVC's cache does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.methods import _fmt, _merge, _run_stages, run_variants, track_in_repo

REPO = Path(__file__).resolve().parents[1]
LIKELIHOOD = {"eval": {"likelihood": True, "likelihood_n": 200}}

# name -> (overrides of params.yaml, {variant: sample overrides}); the first variant is the default sampler.
MODELS: dict[str, tuple[dict, dict[str, dict]]] = {
    "ncsnv2": ({}, {"annealed_langevin": {}}),
    "ncsn": ({"method": {"name": "ncsn"}}, {"annealed_langevin": {}}),
    "ddpm": ({"method": {"name": "ddpm"}, **LIKELIHOOD},
             {"ancestral-1000": {}, "ddim-50": {"sampler": "ddim", "steps": 50}}),
    "sde-vp": ({"method": {"name": "sde", "sde": "vp"}, **LIKELIHOOD},
               {"pc-1000": {}, "ode-rk45": {"sampler": "ode"}}),
    "sde-subvp": ({"method": {"name": "sde", "sde": "subvp"}, **LIKELIHOOD}, {"pc-1000": {}}),
    "sde-ve": ({"method": {"name": "sde", "sde": "ve"}, **LIKELIHOOD}, {"pc-1000": {}}),
    "sohl_dickstein": ({"method": {"name": "sohl_dickstein"}, **LIKELIHOOD}, {"ancestral-40": {}}),
    "edm": ({"method": {"name": "edm"}, **LIKELIHOOD},
            {"edm_heun-18": {}, "dpm_solver-20": {"sampler": "dpm_solver", "steps": 20}}),
}
REFERENCE_STAGES = ("prepare", "fid_reference", "classifier")
REFERENCE_FILES = ("data", "outputs/fid_reference.npz", "outputs/domain_reference.npz", "models/classifier.pt",
                   "metrics/fid_reference.json", "metrics/classifier.json")


def _copy_references(src: Path, dst: Path) -> None:
    for rel in REFERENCE_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (src / rel).is_dir() else shutil.copyfile)(src / rel, dst / rel)


def run_model(name: str, data: str, scratch: Path, references: Path) -> list[dict[str, Any]]:
    """Train one model on `data`, then sample and evaluate each variant; one result row per variant."""
    overrides, variants = MODELS[name]
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), _merge({"data": {"name": data}}, overrides))
    work = scratch / name
    work.mkdir(parents=True)
    _copy_references(references, work)
    os.chdir(work)
    return run_variants(name, base, variants, ["noise_scales", "train", "ema", "distill", "sample", "evaluate", "report"])


def table(rows: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md: one line per model and sampler, each distance next to its floor."""
    head = ("| model | sampler | fid (floor) | fid_domain (floor) | kid (floor) | bpd | elbo_bpd | nfe | train s | "
            "sample s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {_fmt(r['fid'], 2)} ({_fmt(r['fid_floor'], 2)}) | "
                     f"{_fmt(r.get('fid_domain'), 2)} ({_fmt(r.get('fid_domain_floor'), 2)}) | "
                     f"{_fmt(r['kid'], 4)} ({_fmt(r['kid_floor'], 4)}) | {_fmt(r.get('bpd'), 3)} | "
                     f"{_fmt(r.get('elbo_bpd'), 3)} | {r['nfe']} | {_fmt(r['train_s'], 0)} | {_fmt(r['sample_s'], 0)} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", help="data.name (default: digits)")
    parser.add_argument("--only", nargs="*", choices=list(MODELS), help="models to run (default: all)")
    parser.add_argument("--out", default=None, help="where to write the rows (default: benchmarks/images_<data>.json)")
    args = parser.parse_args()
    track_in_repo()
    out = Path(args.out or REPO / "benchmarks" / f"images_{args.data}.json")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-images-") as scratch:
        references = Path(scratch) / "references"
        references.mkdir()
        os.chdir(references)
        Path("params.yaml").write_text(yaml.safe_dump(_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                                                             {"data": {"name": args.data}}), sort_keys=False))
        start = time.perf_counter()
        os.environ["DVC_EXP_NAME"] = f"bench-{args.data}-references"  # not the workspace's MLflow parent run
        _run_stages(list(REFERENCE_STAGES))
        print(f"reference stages: {time.perf_counter() - start:.0f} s", flush=True)
        for name in args.only or list(MODELS):
            rows.extend(run_model(name, args.data, Path(scratch), references))
            out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as it comes: a long run may be stopped
        os.chdir(REPO)
    print(table(rows))


if __name__ == "__main__":
    main()
