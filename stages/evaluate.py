"""evaluate: metrics against held-out data, each next to its floor; likelihoods.

Points: chamfer and earth mover's distances. Images: FID and KID (clean-fid), fid_domain and the
class histogram of the samples (the classifier stage's network), nearest training images of a few
samples (memorisation check). Both: the likelihoods of the method (eval.likelihood).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, models, plots
from pipeline.config import Config
from pipeline.defaults import POINT_SIZES
from pipeline.gmm import GaussianMixture, likelihood_gaps, mixture_metrics
from pipeline.likelihood import model_likelihoods
from pipeline.metrics import pointcloud_metrics
from pipeline.metrics.domain import load_classifier
from pipeline.metrics.images import nearest_training, sample_metrics
from pipeline.tracking import StageRun
from stages.common import (CLASSIFIER, CLASSIFIER_METRICS, DOMAIN_REFERENCE, EVAL_METRICS, EVAL_PLOT, FID_METRICS,
                           FID_REFERENCE, MODEL, NEIGHBOURS_PLOT, NOISE_SCALES, REFERENCE, SAMPLES, TEST, TRAIN,
                           choose_device, data_record, main, plan_of, process_of)

# The memorisation figure: this many samples, each with this many nearest training examples.
NEIGHBOUR_SAMPLES, NEIGHBOURS = 8, 8


def _point_metrics(cfg: Config, gen: np.ndarray) -> dict:
    e = cfg.eval
    n = POINT_SIZES if e.n == "auto" else e.n
    test, reference = np.load(TEST).astype(np.float64), np.load(REFERENCE).astype(np.float64)
    if len(gen) < n:
        raise ValueError(f"samples.npz holds {len(gen)} points but eval.n is {n}; re-run sample")
    gen64 = gen.astype(np.float64)
    metrics = pointcloud_metrics(gen64[:n].reshape(n, -1), test[:n].reshape(n, -1), reference[:n].reshape(n, -1),
                                 cloud_size=e.cloud_size, emd_n=e.emd_n)
    if cfg.data.name == "gmm":
        g = cfg.data.gmm
        mixture = GaussianMixture.from_params(g.weights, g.means, g.covs)
        metrics.update(mixture_metrics(mixture, torch.from_numpy(gen64[:n].reshape(n, -1)),
                                       torch.from_numpy(test[:n].reshape(n, -1))))
    plots.density_comparison(EVAL_PLOT, gen64[:n], test[:n], f"cd {metrics['cd']:.4f} (floor {metrics['cd_floor']:.4f}), "
                                                            f"emd {metrics['emd']:.4f} (floor {metrics['emd_floor']:.4f})")
    train = np.load(TRAIN).astype(np.float64)
    idx = nearest_training(gen[:NEIGHBOUR_SAMPLES].astype(np.float32), train.astype(np.float32), NEIGHBOURS)
    plots.nearest_points(NEIGHBOURS_PLOT, gen64[:NEIGHBOUR_SAMPLES], train[idx], train,
                         "samples (orange) and their nearest training points (blue)")
    return metrics


def _image_metrics(cfg: Config, gen: np.ndarray, info: dict, device: str) -> dict:
    floors = io.read_json(FID_METRICS)
    classifier_record = io.read_json(CLASSIFIER_METRICS)
    fid_ref = io.load_npz(FID_REFERENCE)
    metrics: dict = {}
    if classifier_record:
        classifier = load_classifier(io.load_torch(CLASSIFIER), device=device)
        found = sample_metrics(gen, fid_ref, classifier, io.load_npz(DOMAIN_REFERENCE),
                               num_classes=info["num_classes"], device=device, seed=cfg.eval.seed, progress=True)
        histogram = found.pop("class_histogram")
        metrics.update(found, fid_domain_floor=classifier_record["fid_domain_floor"])
        metrics["class_histogram"] = dict(zip(info["classes"], histogram))
        plots.class_histogram(EVAL_PLOT, histogram, classifier_record["test_class_histogram"], info["classes"],
                              f"classes of the samples (classifier test accuracy "
                              f"{classifier_record['classifier_test_accuracy']:.3f})")
    else:  # one class: no classifier, FID and KID only
        from pipeline.metrics.fid import fid_from_features, inception_features, kid_from_features

        n = len(fid_ref["test"])
        feats = inception_features(gen[:n], device=device, progress=True)
        metrics.update(fid=fid_from_features(feats, fid_ref["test"]),
                       kid=kid_from_features(feats, fid_ref["test"], cfg.eval.seed))
        plots.image_grid(EVAL_PLOT, gen[:64], "samples (no classes: no class histogram)")
    metrics.update({k: floors[k] for k in ("fid_floor", "kid_floor", "fid_n", "fid_mode", "fid_reference",
                                           "fid_weights", "fid_impl")})
    idx = nearest_training(gen[:NEIGHBOUR_SAMPLES], np.load(TRAIN), NEIGHBOURS)
    plots.nearest_neighbours(NEIGHBOURS_PLOT, gen[:NEIGHBOUR_SAMPLES], np.load(TRAIN)[idx],
                             "each row: a sample, then its nearest training images (pixel L2)")
    return metrics


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    e = cfg.eval
    info = data_record()
    gen = io.load_npz(SAMPLES)["x"]
    device = choose_device(cfg.train.device)
    images = info["kind"] == "images"
    metrics = _image_metrics(cfg, gen, info, str(device)) if images else _point_metrics(cfg, gen)
    if e.likelihood:
        plan = plan_of(cfg)
        record = io.read_json(NOISE_SCALES)
        process = process_of(record)
        kind, fn = models.load_model(MODEL, process, dtype=torch.float64, device=device)
        held_out = np.load(TEST)[: e.likelihood_n]
        x = torch.from_numpy(held_out if images else held_out.astype(np.float64)).to(device)
        likelihoods = model_likelihoods(kind, fn, process, x, ode=plan.ode, elbo=plan.elbo, divergence=e.divergence,
                                        rtol=e.rtol, atol=e.atol, elbo_slices=e.elbo_slices,
                                        elbo_variance=e.elbo_variance, generator=torch.Generator().manual_seed(e.seed),
                                        scaling=record.get("scaling"))
        metrics.update(likelihoods)
        if cfg.data.name == "gmm":
            g = cfg.data.gmm
            metrics.update(likelihood_gaps(GaussianMixture.from_params(g.weights, g.means, g.covs), x, likelihoods))
    io.write_json(EVAL_METRICS, metrics)
    run.log_params({"eval": e.model_dump(mode="json")} | {k: v for k, v in metrics.items() if isinstance(v, str)})
    run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, (str, dict))})
    run.log_artifact(EVAL_PLOT)
    run.log_artifact(NEIGHBOURS_PLOT)


if __name__ == "__main__":
    main("evaluate", evaluate_stage)
