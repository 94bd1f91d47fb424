"""Image defaults by measurement: one training per variant of the `auto` settings of a data set, its quality and
its time, to choose what `auto` resolves to.

    python -m benchmarks.ablation --data digits [--only NAME ...]

The once-per-data-set stages (prepare, fid_reference, classifier) run once in scratch/references and are copied
into each variant's own scratch folder, which then runs noise_scales, train, ema, sample and evaluate with the
repo's params.yaml, data.name and the variant's overrides (the numbers `dvc exp run -S ...` gives for the same
keys). Each row: fid and fid_domain with their floors, kid, the seconds of each stage and `total_s`, their sum
with the reference stages' (what a fresh `dvc exp run -S data.name=...` takes). Rows are written to
benchmarks/ablation_<data>.json as they come, so a long run may be stopped; a variant run again replaces its row,
the others' rows are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.images import REFERENCE_STAGES, _copy_references
from benchmarks.methods import REPO, _fmt, _merge, _run_stages, track_in_repo

MODEL_STAGES = ["noise_scales", "train", "ema", "distill", "sample", "evaluate"]

# What `auto` resolved to on digits before this ablation chose its values (fp32, lr 1e-3, dropout 0.1): the rows
# named "before ..." change one or more things against it, the others against today's auto.
BEFORE = {"train": {"precision": "fp32", "lr": 1e-3}, "model": {"dropout": 0.1}}


def _before(*changes: dict) -> dict:
    out = BEFORE
    for change in changes:
        out = _merge(out, change)
    return out


BF16, LR2 = {"train": {"precision": "bf16"}}, {"train": {"lr": 2e-3}}
FP32_X3 = {"train": {"precision": "fp32"}, "eval": {"fid_seeds": 3}}

# data set -> {variant: overrides of params.yaml}; "auto": every key at its default.
VARIANTS: dict[str, dict[str, dict]] = {
    "digits": {
        "auto": {},
        "before": _before(),
        "before + bf16": _before(BF16),
        "before + steps 3000": _before({"train": {"steps": 3000}}),
        "before + eps": _before({"method": {"parameterization": "eps"}}),
        "before + lr 2e-3": _before(LR2),
        "before + batch 64": _before({"train": {"batch_size": 64}}),
        "before + bf16 + lr 2e-3": _before(BF16, LR2),
        "before + bf16 + lr 2e-3 + T 10": _before(BF16, LR2, {"noise": {"steps_per_scale": 10}}),
        "steps 1800": {"train": {"steps": 1800}},
        "steps 1500": {"train": {"steps": 1500}},
        "lr 3e-3": {"train": {"lr": 3e-3}},
        "batch 256": {"train": {"batch_size": 256}},
        "warm-up 200": {"train": {"warmup": 200}},
        "channels 48": {"model": {"channels": 48}},
        "2 res blocks": {"model": {"num_res_blocks": 2}},
        "posthoc 0.05": {"ema": {"method": "posthoc", "sigma_rel": 0.05}},
        # fp32 whatever the CPU, so the rows mean the same on every machine; three sample sets of N each
        # (eval.fid_seeds: `fid` stays set 0's, `fid_mean` joins it), since one set's fid moves by about a unit
        "fp32 x3": FP32_X3,
        "fp32 x3 + lr linear": _merge(FP32_X3, {"train": {"lr_decay": "linear"}}),
        "fp32 x3 + lr cosine": _merge(FP32_X3, {"train": {"lr_decay": "cosine"}}),
        "fp32 x3 + lr cosine + lr 3e-3": _merge(FP32_X3, {"train": {"lr_decay": "cosine", "lr": 3e-3}}),
        "fp32 x3 + lr cosine + T 10": _merge(FP32_X3, {"train": {"lr_decay": "cosine"},
                                                       "noise": {"steps_per_scale": 10}}),
    },
    # NCSNv2 itself (auto) is no row: its annealed Langevin walks about 100 scales x 5 steps, 2,000 samples of
    # which take over an hour here (docs/benchmarks.md); EDM's Heun takes 35 evaluations.
    "fashion_mnist": {
        "edm": {"method": {"name": "edm"}},
        "edm fp32": {"method": {"name": "edm"}, "train": {"precision": "fp32"}},
        "edm lr 5e-4": {"method": {"name": "edm"}, "train": {"lr": 5e-4}},
        "ddpm ddim-50": {"method": {"name": "ddpm"}, "sample": {"sampler": "ddim", "steps": 50}},
    },
}


def run_data(data: str, names: list[str], scratch: Path, out: Path) -> list[dict[str, Any]]:
    """The reference stages once, then every variant of `names`; rows written to `out` as they come."""
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                  {"data": {"name": data}, "tracking": {"experiment": "benchmarks"}})
    ref = scratch / "references"
    ref.mkdir(parents=True)
    os.chdir(ref)
    Path("params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    os.environ["DVC_EXP_NAME"] = f"bench-ablation-{data}-references"
    reference_s = _run_stages(list(REFERENCE_STAGES))
    kept = [r for r in (json.loads(out.read_text()) if out.exists() else []) if r["variant"] not in names]
    rows = []
    try:
        for name in names:
            work = scratch / name.replace(" ", "_")
            work.mkdir()
            _copy_references(ref, work)
            os.chdir(work)
            Path("params.yaml").write_text(yaml.safe_dump(_merge(base, VARIANTS[data][name]), sort_keys=False))
            os.environ["DVC_EXP_NAME"] = f"bench-ablation-{data}-{name.replace(' ', '-')}"
            seconds = _run_stages(MODEL_STAGES)
            metrics = json.loads(Path("metrics/evaluate.json").read_text())
            train = json.loads(Path("metrics/train.json").read_text())
            rows.append({"data": data, "variant": name, "overrides": VARIANTS[data][name], **metrics,
                         "num_params": train.get("num_params"), "steps": train.get("steps"),
                         **{f"{k}_s": v for k, v in {**reference_s, **seconds}.items()},
                         "total_s": sum(reference_s.values()) + sum(seconds.values())})
            print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps(kept + rows, indent=1) + "\n")
    finally:
        os.chdir(REPO)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """One line per variant: fid / floor (sample set 0), the mean over eval.fid_seeds sets where there are
    several, fid_domain / floor, kid, train s, total s."""
    head = ("| variant | fid (× floor) | fid mean of sets (× floor) | fid_domain (× floor) | kid | train s "
            "| total s |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        mean = (f"{_fmt(r['fid_mean'], 2)} ({r['fid_mean'] / r['fid_floor']:.2f}×, {r['fid_sets']} sets)"
                if "fid_mean" in r else "–")
        lines.append(f"| {r['variant']} | {_fmt(r['fid'], 2)} ({r['fid'] / r['fid_floor']:.2f}×) | {mean} | "
                     f"{_fmt(r['fid_domain'], 2)} ({r['fid_domain'] / r['fid_domain_floor']:.2f}×) | "
                     f"{_fmt(r['kid'], 4)} | {_fmt(r['train_s'], 0)} | {_fmt(r['total_s'], 0)} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=list(VARIANTS), required=True)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all of the data set's)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS[args.data])
    unknown = [n for n in names if n not in VARIANTS[args.data]]
    if unknown:
        parser.error(f"unknown variants {unknown}; {args.data} has: {', '.join(VARIANTS[args.data])}")
    track_in_repo()
    out = REPO / "benchmarks" / f"ablation_{args.data}.json"
    with tempfile.TemporaryDirectory(prefix="bench-ablation-") as scratch:
        rows = run_data(args.data, names, Path(scratch), out)
    print(table(rows))


if __name__ == "__main__":
    main()
