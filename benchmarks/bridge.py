"""Benchmark the Schrödinger bridge: cd / emd at each end, the coupling's cost against POT's entropic plan, time.

    python -m benchmarks.bridge [--only NAME ...] [--out benchmarks/bridge.json]
    python -m benchmarks.bridge --table benchmarks/bridge_a.json benchmarks/bridge_b.json  # join and print
    python -m benchmarks.bridge --oracle [ipf] [dsbm]  # the Gaussian closed form against each trained solver

Each model runs the pipeline's stages in-process in its own scratch directory with the repo's params.yaml plus the
model's overrides (the numbers `dvc exp run -S ...` gives), walking forward and then backward on the same bridge.
8gaussians -> moons with each solver (the issue's must-hold: cd at the target <= 2 x its floor, ot_cost within 10 %
of ot_cost_sinkhorn), and the swiss roll -> N(0, I) with the VP reference, whose backward walk is a generative model
of the swiss roll to compare with method.name: sde (benchmarks/results.json, sde-vp).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from benchmarks.methods import REPO, _fmt, _merge, bench_parser, run_models, run_variants
from stages.common import STAGE_BODIES

BRIDGE = {"method": {"name": "schrodinger_bridge"}}
WAYS = {"forward": {"direction": "forward"}, "backward": {"direction": "backward"}}
# name -> (overrides of params.yaml, {variant: sample overrides}).
MODELS: dict[str, tuple[dict, dict[str, dict]]] = {
    "8gaussians-moons-ipf": (_merge(BRIDGE, {"data": {"name": "8gaussians", "target": "moons"},
                                             "method": {"sb": {"solver": "ipf"}}}), WAYS),
    "8gaussians-moons-dsbm": (_merge(BRIDGE, {"data": {"name": "8gaussians", "target": "moons"},
                                              "method": {"sb": {"solver": "dsbm"}}}), WAYS),
    # The VP SDE's β reaches 20: 20 Euler steps are too coarse for it (DDPM takes 1000), so 100 here.
    "swissroll-gaussian-vp-dsbm": (_merge(BRIDGE, {"data": {"name": "swissroll", "target": "gaussian"},
                                                   "method": {"sb": {"solver": "dsbm", "reference": "vp",
                                                                     "num_steps": 100}}}),
                                   {"backward": {"direction": "backward"}}),
}


def run_model(name: str, scratch: Path) -> list[dict[str, Any]]:
    overrides, variants = MODELS[name]
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    work = scratch / name
    work.mkdir(parents=True)
    os.chdir(work)
    rows = run_variants(name, base, variants, list(STAGE_BODIES))
    train = json.loads(Path("metrics/train.json").read_text())
    for row in rows:
        row["iterations"] = base["method"]["sb"]["iterations"]
        row["train_metrics"] = train
    return rows


# The Gaussian oracle: two 2-D Gaussians whose covariances do not commute, and the bridge's settings for it.
ORACLE = {"mean0": [-1.0, 0.0], "cov0": [[1.0, 0.3], [0.3, 0.5]],
          "mean1": [1.5, 0.5], "cov1": [[0.6, -0.2], [-0.2, 1.2]], "sigma": 1.0, "n_train": 10_000, "n_test": 4_000}
ORACLE_SETTINGS = {"ipf": {"iterations": 8, "steps": 2_000, "num_steps": 20},
                   "dsbm": {"iterations": 3, "steps": 2_000, "num_steps": 50}}


def gaussian_oracle(solver: str, seed: int = 0) -> dict[str, Any]:
    """Train `solver` between the ORACLE Gaussians and compare the coupling's cross-covariance Cov(X_0, X_1) of
    n_test fresh pairs with the closed form (families.schrodinger_bridge.bridge.gaussian_coupling), entry by entry in standard errors
    sqrt((Σ0_ii Σ1_jj + C_ij²) / n); also the end's mean and covariance. One row per iteration."""
    import time

    import numpy as np
    import torch

    from families.schrodinger_bridge.bridge import gaussian_coupling, transport
    from families.schrodinger_bridge.solvers import BridgeSettings, train_bridge
    from pipeline.nets import build_network
    from pipeline.processes import BrownianMotion

    o, rng = ORACLE, np.random.default_rng(seed)
    m0, s0, m1, s1 = (np.array(o[k]) for k in ("mean0", "cov0", "mean1", "cov1"))
    draw = lambda m, s, n: torch.from_numpy(m + rng.standard_normal((n, 2)) @ np.linalg.cholesky(s).T).float()  # noqa
    source, target, fresh = draw(m0, s0, o["n_train"]), draw(m1, s1, o["n_train"]), draw(m0, s0, o["n_test"])
    exact = gaussian_coupling(s0, s1, o["sigma"])
    process = BrownianMotion(o["sigma"])
    spec = {"kind": "mlp", "dim": 2, "hidden": 64, "blocks": 2, "emb_dim": 32, "parameterization": "drift"}
    nets = {"forward": build_network(spec, seed=1), "backward": build_network(spec, seed=2)}
    settings = BridgeSettings(solver, batch_size=256, lr=1e-3, seed=seed, **ORACLE_SETTINGS[solver])
    n = o["n_test"]
    se = np.sqrt((np.outer(np.diag(s0), np.diag(s1)) + exact**2) / n)
    start = time.perf_counter()

    def evaluate(iteration: int, step: int, drifts: dict) -> dict:
        end = transport(drifts["forward"], process, fresh, "forward", settings.num_steps,
                        torch.Generator().manual_seed(seed)).x.numpy()
        joint = np.cov(np.concatenate([fresh.numpy(), end], axis=1).T)
        z = np.abs(joint[:2, 2:] - exact) / se
        row = {"solver": solver, "iteration": iteration, "seconds": time.perf_counter() - start,
               "cross_cov": joint[:2, 2:].round(4).tolist(), "exact": exact.round(4).tolist(),
               "max_z": float(z.max()), "mean_z": float((np.abs(end.mean(0) - m1) / np.sqrt(np.diag(s1) / n)).max()),
               "end_cov": joint[2:, 2:].round(4).tolist()}
        print(json.dumps(row), flush=True)
        return row

    return train_bridge(nets, process, source, target, settings, evaluate=evaluate).eval_rows[-1]


def table(rows: list[dict[str, Any]]) -> str:
    """The table of docs/bridges.md: one line per bridge and direction."""
    head = ("| bridge | walk | cd (floor) | emd (floor) | ot_cost | ot_cost_sinkhorn | gap | train s |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        gap = f"{100 * r['ot_cost_gap']:.1f} %" if "ot_cost_gap" in r else "–"
        lines.append(f"| {r['model']} | {r['sampler']} | {_fmt(r['cd'])} ({_fmt(r['cd_floor'])}) | "
                     f"{_fmt(r['emd'])} ({_fmt(r['emd_floor'])}) | {_fmt(r['ot_cost'], 3)} | "
                     f"{_fmt(r.get('ot_cost_sinkhorn'), 3)} | {gap} | {_fmt(r['train_s'], 0)} |")
    score = REPO / "benchmarks" / "results.json"  # method.name: sde (VP) on the swiss roll, for the VP bridge
    if any(r["model"].startswith("swissroll-gaussian") for r in rows) and score.is_file():
        for r in json.loads(score.read_text()):
            if r["model"] == "sde-vp":
                lines.append(f"| score SDE, VP (`make bench`) | {r['sampler']}, nfe {r['nfe']} | {_fmt(r['cd'])} "
                             f"({_fmt(r['cd_floor'])}) | {_fmt(r['emd'])} ({_fmt(r['emd_floor'])}) | – | – | – | "
                             f"{_fmt(r['train_s'], 0)} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, list(MODELS), "bridge.json")
    parser.add_argument("--table", nargs="*", help="join these row files into --out and print the table; no run")
    parser.add_argument("--oracle", nargs="*", choices=["ipf", "dsbm"],
                        help="only the Gaussian oracle of these solvers (rows printed per iteration)")
    args = parser.parse_args()
    if args.oracle is not None:
        for solver in args.oracle or ["ipf", "dsbm"]:
            gaussian_oracle(solver)
        return
    if args.table:
        rows = [row for path in args.table for row in json.loads(Path(path).read_text())]
    else:
        rows = run_models(run_model, args.only or list(MODELS))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
