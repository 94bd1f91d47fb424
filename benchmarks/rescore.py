"""Re-score a finished 2-D run from its files alone: cd of outputs/samples.npz against data/test.npy, computed
with SciPy's k-d tree (an implementation independent of pipeline.metrics), clouds of 100 points as the evaluate
stage pairs them (docs/design.md, "Metrics, defined once"), next to what metrics/evaluate.json says.

    python -m benchmarks.rescore [RUN_DIR]          # default: the current directory
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

CLOUD = 100


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """mean_a min_b |a − b|² + mean_b min_a |a − b|² by nearest-neighbour queries."""
    return float((cKDTree(b).query(a)[0] ** 2).mean() + (cKDTree(a).query(b)[0] ** 2).mean())


def rescore(run: Path) -> dict:
    x = np.load(run / "outputs" / "samples.npz")["x"].astype(np.float64)
    test = np.load(run / "data" / "test.npy").astype(np.float64)
    n = min(len(x), len(test)) // CLOUD * CLOUD
    cd = float(np.mean([chamfer(x[i:i + CLOUD], test[i:i + CLOUD]) for i in range(0, n, CLOUD)]))
    stage = json.loads((run / "metrics" / "evaluate.json").read_text())
    return {"cd_rescored": cd, "cd_stage": stage.get("cd"), "nfe": json.loads(
        (run / "metrics" / "sample.json").read_text())["nfe"], "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=".", type=Path)
    print(json.dumps(rescore(parser.parse_args().run)))


if __name__ == "__main__":
    main()
