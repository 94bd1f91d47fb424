"""evaluate: chamfer and earth mover's distances against held-out data, each next to its floor."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, plots
from pipeline.config import Config
from pipeline.gmm import GaussianMixture, mixture_metrics
from pipeline.metrics import pointcloud_metrics
from pipeline.tracking import StageRun
from stages.common import EVAL_METRICS, EVAL_PLOT, REFERENCE, SAMPLES, TEST, main


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    e = cfg.eval
    gen = io.load_npz(SAMPLES)["x"].astype(np.float64)
    test, reference = np.load(TEST).astype(np.float64), np.load(REFERENCE).astype(np.float64)
    if len(gen) < e.n:
        raise ValueError(f"samples.npz holds {len(gen)} points but eval.n is {e.n}; re-run sample")
    gen, test, reference = gen[: e.n].reshape(e.n, -1), test[: e.n].reshape(e.n, -1), reference[: e.n].reshape(e.n, -1)
    metrics = pointcloud_metrics(gen, test, reference, cloud_size=e.cloud_size, emd_n=e.emd_n)
    if cfg.data.name == "gmm":
        g = cfg.data.gmm
        mixture = GaussianMixture.from_params(g.weights, g.means, g.covs)
        metrics.update(mixture_metrics(mixture, torch.from_numpy(gen), torch.from_numpy(test)))
    io.write_json(EVAL_METRICS, metrics)
    plots.density_comparison(EVAL_PLOT, gen, test, f"cd {metrics['cd']:.4f} (floor {metrics['cd_floor']:.4f}), "
                                                   f"emd {metrics['emd']:.4f} (floor {metrics['emd_floor']:.4f})")
    run.log_params({"eval": e.model_dump(mode="json")})
    run.log_metrics(metrics)
    run.log_artifact(EVAL_PLOT)


if __name__ == "__main__":
    main("evaluate", evaluate_stage)
