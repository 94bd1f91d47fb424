"""evaluate: chamfer and earth mover's distances against held-out data, each next to its floor; likelihoods."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, models, plots
from pipeline.config import Config
from pipeline.gmm import GaussianMixture, likelihood_gaps, mixture_metrics
from pipeline.likelihood import model_likelihoods
from pipeline.metrics import pointcloud_metrics
from pipeline.tracking import StageRun
from stages.common import EVAL_METRICS, EVAL_PLOT, MODEL, NOISE_SCALES, REFERENCE, SAMPLES, TEST, main, plan_of, process_of


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    e = cfg.eval
    gen = io.load_npz(SAMPLES)["x"].astype(np.float64)
    test, reference = np.load(TEST).astype(np.float64), np.load(REFERENCE).astype(np.float64)
    if len(gen) < e.n:
        raise ValueError(f"samples.npz holds {len(gen)} points but eval.n is {e.n}; re-run sample")
    held_out = test
    gen, test, reference = gen[: e.n].reshape(e.n, -1), test[: e.n].reshape(e.n, -1), reference[: e.n].reshape(e.n, -1)
    metrics = pointcloud_metrics(gen, test, reference, cloud_size=e.cloud_size, emd_n=e.emd_n)
    mixture = None
    if cfg.data.name == "gmm":
        g = cfg.data.gmm
        mixture = GaussianMixture.from_params(g.weights, g.means, g.covs)
        metrics.update(mixture_metrics(mixture, torch.from_numpy(gen), torch.from_numpy(test)))
    if e.likelihood:
        plan = plan_of(cfg)
        process = process_of(io.read_json(NOISE_SCALES))
        kind, fn = models.load_model(MODEL, process, dtype=torch.float64)
        x = torch.from_numpy(held_out[: e.likelihood_n])
        likelihoods = model_likelihoods(kind, fn, process, x, ode=plan.ode, elbo=plan.elbo, divergence=e.divergence,
                                        rtol=e.rtol, atol=e.atol, elbo_slices=e.elbo_slices,
                                        elbo_variance=e.elbo_variance, generator=torch.Generator().manual_seed(e.seed))
        metrics.update(likelihoods)
        if mixture is not None:
            metrics.update(likelihood_gaps(mixture, x, likelihoods))
    io.write_json(EVAL_METRICS, metrics)
    plots.density_comparison(EVAL_PLOT, gen, test, f"cd {metrics['cd']:.4f} (floor {metrics['cd_floor']:.4f}), "
                                                   f"emd {metrics['emd']:.4f} (floor {metrics['emd_floor']:.4f})")
    run.log_params({"eval": e.model_dump(mode="json")})
    run.log_metrics(metrics)
    run.log_artifact(EVAL_PLOT)


if __name__ == "__main__":
    main("evaluate", evaluate_stage)
