"""Benchmark post-hoc EMA (Karras et al. 2024, sec. 3): quality against the EMA width sigma_rel from one training,
beside the decay EMA of the same training (EDM2's fig. 5).

    python -m benchmarks.posthoc [--only swissroll digits fashion_mnist]

Each study trains once in a scratch folder with the repo's params.yaml and its overrides (train.posthoc at its
defaults: profiles 0.05 and 0.10, 20 snapshots), every stage with ema.method: decay; then the raw weights
(ema.method: none) and, for each sigma_rel of its sweep, ema.method: posthoc, each through the stages ema, sample
and evaluate, as `dvc exp run -S ema.method=posthoc -S ema.sigma_rel=...` re-runs them. Writes
benchmarks/posthoc_<study>.json (one row per final model: the metrics, the ema stage's seconds, the
reconstruction's relative profile error) and benchmarks/posthoc_<study>.png. A study with eval.fid_seeds > 1 shows
the mean FID over its sample sets (fid_mean) first.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from benchmarks.methods import REPO, _fmt, _merge, _run_stages, track_in_repo

# sigma_rel swept (EDM2's fig. 5 spans 0.01-0.25); outside the tracked 0.05-0.10 the reconstruction is looser
SWEEP = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
# study -> (overrides of params.yaml, the sigma_rels swept)
STUDIES: dict[str, tuple[dict, tuple[float, ...]]] = {
    "swissroll": ({}, SWEEP),
    "digits": ({"data": {"name": "digits"}}, SWEEP),
    # EDM: NCSNv2's annealed Langevin would take over an hour per width for 2,000 samples here (its ~100 scales)
    "fashion_mnist": ({"data": {"name": "fashion_mnist"}, "method": {"name": "edm"}}, SWEEP),
    # whether an EMA still helps when the lr itself decays to zero (train.lr_decay): fp32 on every CPU, three
    # sample sets of N a final model, the narrow widths only (the wide ones lose on digits at a constant lr)
    "digits_lr_cosine": ({"data": {"name": "digits"}, "train": {"precision": "fp32", "lr_decay": "cosine"},
                          "eval": {"fid_seeds": 3}}, (0.02, 0.05, 0.10)),
}
# the quality numbers of each kind (lower is better), the first the figure's headline
METRICS = {"points": ("cd", "emd"), "images": ("fid", "fid_domain", "kid")}
# the final models besides the post-hoc widths, with how the figure draws them
BASELINES = {"decay": ("decay EMA (train.ema_decay)", "C1", "--"),
             "none": ("raw weights (ema.method none)", "C2", "-.")}


def _row(name: str, ema: dict, seconds: dict[str, float]) -> dict[str, Any]:
    from pipeline.posthoc import combination

    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    row = {"data": name, "ema": ema.get("method", "decay"), "sigma_rel": ema.get("sigma_rel"), **metrics,
           **{f"{k}_s": v for k, v in seconds.items()}}
    if ema.get("method") == "posthoc":
        row["profile_error"] = combination("models/posthoc", ema["sigma_rel"])[0].relative
    print(json.dumps(row), flush=True)
    return row


def run_study(name: str, scratch: Path) -> list[dict[str, Any]]:
    """One training, the decay EMA's row, the raw weights' row, then one row per sigma_rel of the study's sweep."""
    overrides, sweep = STUDIES[name]
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    base = _merge(base, {"tracking": {"experiment": "benchmarks"}})
    work = scratch / name
    work.mkdir(parents=True)
    os.chdir(work)
    try:
        rows = []
        Path("params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        os.environ["DVC_EXP_NAME"] = f"bench-posthoc-{name}-decay"
        from stages.common import STAGE_BODIES

        rows.append(_row(name, {}, _run_stages(list(STAGE_BODIES))))
        finals = [{"method": "none"}] + [{"method": "posthoc", "sigma_rel": s} for s in sweep]
        for ema in finals:
            label = f"{ema['sigma_rel']:g}" if "sigma_rel" in ema else ema["method"]
            Path("params.yaml").write_text(yaml.safe_dump(_merge(base, {"ema": ema}), sort_keys=False))
            os.environ["DVC_EXP_NAME"] = f"bench-posthoc-{name}-{label}"
            rows.append(_row(name, ema, _run_stages(["ema", "distill", "sample", "evaluate"])))
        return rows
    finally:
        os.chdir(REPO)


def kind_of_rows(rows: list[dict[str, Any]]) -> str:
    return "images" if "fid" in rows[0] else "points"


def metric_names(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics shown, headline first: the mean FID over the sample sets where there are several."""
    names = METRICS[kind_of_rows(rows)]
    return ("fid_mean", *names) if "fid_mean" in rows[0] else names


def floor_of(row: dict[str, Any], key: str) -> Optional[float]:
    """A metric's floor (held-out data against held-out data); the mean FID's is the FID floor."""
    return row.get("fid_floor" if key == "fid_mean" else f"{key}_floor")


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Each metric against sigma_rel (log axis), the decay EMA of the same training as a dashed line, the floor
    as a dotted one (EDM2's fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = metric_names(rows)
    sweep = sorted((r for r in rows if r["ema"] == "posthoc"), key=lambda r: r["sigma_rel"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, key in zip(axes[0], names):
        ax.plot([r["sigma_rel"] for r in sweep], [r[key] for r in sweep], "o-", label="post-hoc EMA")
        for r in rows:
            if r["ema"] in BASELINES:
                label, colour, style = BASELINES[r["ema"]]
                ax.axhline(r[key], color=colour, ls=style, label=label)
        if floor_of(rows[0], key) is not None:
            ax.axhline(floor_of(rows[0], key), color="grey", ls=":", label="floor (held-out data)")
        ax.axvspan(0.05, 0.10, color="C0", alpha=0.08, label="tracked profiles")
        ax.set_xscale("log")
        ticks = [r["sigma_rel"] for r in sweep]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7, rotation=45)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sigma_rel")
        ax.set_title(key)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['data']}: quality against the EMA width, one training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    """One line per final model: the metrics (with floors), the reconstruction's profile error, the ema stage."""
    names = metric_names(rows)
    head = ("| final model | " + " | ".join(names) + " | profile error | ema stage s |\n|---|"
            + "---|" * (len(names) + 2) + "\n")
    lines = []
    for r in rows:
        what = {"decay": "decay EMA", "none": "raw weights"}.get(r["ema"]) or f"post-hoc σ_rel {r['sigma_rel']:g}"
        cells = [f"{_fmt(r[k], 4)}" + (f" ({_fmt(floor_of(r, k), 4)})" if floor_of(r, k) is not None else "")
                 for k in names]
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {_fmt(r.get('profile_error'), 4)} | "
                     f"{_fmt(r.get('ema_s'), 1)} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(STUDIES), help="data sets (default: all)")
    args = parser.parse_args()
    track_in_repo()
    with tempfile.TemporaryDirectory(prefix="bench-posthoc-") as scratch:
        for name in args.only or list(STUDIES):
            rows = run_study(name, Path(scratch))
            (REPO / "benchmarks" / f"posthoc_{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
            figure(rows, REPO / "benchmarks" / f"posthoc_{name}.png")
            print(table(rows))


if __name__ == "__main__":
    main()
