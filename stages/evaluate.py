"""evaluate: metrics against held-out data, each next to its floor; likelihoods.

Points: chamfer and earth mover's distances. Images: FID and KID (clean-fid), fid_domain and the
class histogram of the samples (the classifier stage's network), nearest training images of a few
samples (memorisation check). Both: the likelihoods of the method (eval.likelihood).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy import stats

from pipeline import io, models, plots
from pipeline.config import Config
from pipeline.defaults import POINT_SIZES
from pipeline.gmm import GaussianMixture, likelihood_gaps, mixture_metrics
from pipeline.likelihood import model_likelihoods
from pipeline.edit import rms_distance
from pipeline.inpaint import gmm_conditional_cdf
from pipeline.metrics import pointcloud_metrics
from pipeline.metrics.conditional import (cond_accuracy, mixture_class_predictions, per_class_fid,
                                          point_class_predictions)
from pipeline.metrics.domain import classifier_features, load_classifier
from pipeline.metrics.fid import (fid_by_svd, fid_from_features, frechet_distance, inception_features,
                                  kid_from_features)
from pipeline.metrics.images import feature_metrics, nearest_training, sample_features
from pipeline.metrics.pointcloud import chamfer_clouds
from pipeline.tracking import StageRun
from stages.common import (CLASSIFIER, CLASSIFIER_METRICS, DOMAIN_REFERENCE, EVAL_METRICS, EVAL_PLOT, FID_METRICS,
                           FID_REFERENCE, LABELS, MODEL, NEIGHBOURS_PLOT, NOISE_SCALES, REFERENCE, SAMPLES, TEST, TRAIN,
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


def _image_metrics(cfg: Config, gen: np.ndarray, info: dict, device: str, requested: Optional[np.ndarray]) -> dict:
    floors = io.read_json(FID_METRICS)
    classifier_record = io.read_json(CLASSIFIER_METRICS)
    fid_ref = io.load_npz(FID_REFERENCE)
    metrics: dict = {}
    if classifier_record:
        classifier = load_classifier(io.load_torch(CLASSIFIER), device=device)
        n = len(fid_ref["test"])
        features = sample_features(gen, n, classifier, device=device, progress=True)
        found = feature_metrics(features, fid_ref, io.load_npz(DOMAIN_REFERENCE), num_classes=info["num_classes"],
                                seed=cfg.eval.seed)
        histogram = found.pop("class_histogram")
        metrics.update(found, fid_domain_floor=classifier_record["fid_domain_floor"])
        metrics["class_histogram"] = dict(zip(info["classes"], histogram))
        if requested is not None:  # a class-conditional model's guided samples
            metrics["cond_accuracy"] = cond_accuracy(features["predicted"], requested[:n])
            per_class = per_class_fid(features["inception"], requested[:n], fid_ref["test"],
                                      np.load(LABELS["test"])[:n], fid_ref["reference"],
                                      np.load(LABELS["reference"])[:n], num_classes=info["num_classes"])
            metrics.update({k: v for k, v in per_class.items() if not isinstance(v, list)})
            metrics["fid_per_class"] = dict(zip(info["classes"], per_class["fid_per_class"]))
        plots.class_histogram(EVAL_PLOT, histogram, classifier_record["test_class_histogram"], info["classes"],
                              f"classes of the samples (classifier test accuracy "
                              f"{classifier_record['classifier_test_accuracy']:.3f})")
    else:  # one class: no classifier, FID and KID only
        n = len(fid_ref["test"])
        feats = inception_features(gen[:n], device=device, progress=True)
        metrics.update(fid=fid_from_features(feats, fid_ref["test"]),
                       kid=kid_from_features(feats, fid_ref["test"], cfg.eval.seed))
        plots.image_grid(EVAL_PLOT, gen[:64], "samples (no classes: no class histogram)")
    metrics.update(_fid_protocol(floors))
    idx = nearest_training(gen[:NEIGHBOUR_SAMPLES], np.load(TRAIN), NEIGHBOURS)
    plots.nearest_neighbours(NEIGHBOURS_PLOT, gen[:NEIGHBOUR_SAMPLES], np.load(TRAIN)[idx],
                             "each row: a sample, then its nearest training images (pixel L2)")
    return metrics


def _fid_protocol(floors: dict) -> dict:
    return {k: floors[k] for k in ("fid_floor", "kid_floor", "fid_n", "fid_mode", "fid_reference", "fid_weights",
                                   "fid_impl")}


def _point_cond_accuracy(cfg: Config, gen: np.ndarray, requested: np.ndarray) -> float:
    """The class accuracy of guided points: the Bayes classifier of the true mixture for gmm (classes are its
    components), a nearest-neighbour classifier of the labelled training points otherwise."""
    if cfg.data.name == "gmm":
        g = cfg.data.gmm
        mixture = GaussianMixture.from_params(g.weights, g.means, g.covs)
        predicted = mixture_class_predictions(mixture, gen.astype(np.float64))
    else:
        predicted = point_class_predictions(np.load(TRAIN), np.load(LABELS["train"]), gen)
    return cond_accuracy(predicted, requested)


# --------------------------------------------------------------------------- sample.task other than generate


def _completion_metrics(cfg: Config, outputs: np.ndarray, names: list[str], info: dict, device: str) -> dict:
    """FID and KID against the reference split (the outputs are made from test items, so the test split would
    flatter them) of each named output set (M, n, C, H, W), and fid_domain where there is a classifier. The FID is
    clean-fid's exactly, computed as fid_by_svd: one per method or t0, each a 2,048-D sqrtm (~20 s) otherwise."""
    fid_ref, floors = io.load_npz(FID_REFERENCE), io.read_json(FID_METRICS)
    n = len(fid_ref["reference"])
    classifier_record = io.read_json(CLASSIFIER_METRICS)
    classifier = load_classifier(io.load_torch(CLASSIFIER), device=device) if classifier_record else None
    metrics = {}
    for name, out in zip(names, outputs):
        if len(out) < n:
            raise ValueError(f"FID compares {n} images each side but there are only {len(out)} outputs; "
                             f"re-run sample with sample.n >= eval.fid_n")
        feats = inception_features(out[:n], device=device, progress=True)
        metrics[f"fid_{name}"] = fid_by_svd(feats, fid_ref["reference"])
        metrics[f"kid_{name}"] = kid_from_features(feats, fid_ref["reference"], cfg.eval.seed)
        if classifier is not None:
            domain = classifier_features(classifier, out[:n], device=device)
            metrics[f"fid_domain_{name}"] = frechet_distance(domain, io.load_npz(DOMAIN_REFERENCE)["reference"])
    if classifier_record:
        metrics["fid_domain_floor"] = classifier_record["fid_domain_floor"]
    return metrics | _fid_protocol(floors)


def _inpaint_metrics(cfg: Config, samples: dict, info: dict, device: str) -> dict:
    """Per method: the RMS error of the generated part against the originals, FID/KID of the completed images
    against the reference split, and on gmm data with the 'first' mask the Kolmogorov-Smirnov statistic of the
    probability-integral transform F(x_u | x_K) under the exact conditional (0 for an exact inpainter)."""
    x, known, mask = samples["x"], samples["x_known"], samples["mask"]
    names = [str(m) for m in samples["methods"]]
    hidden = mask == 0
    scale = 255.0 if info["kind"] == "images" else 1.0
    metrics: dict = {}
    for name, out in zip(names, x):
        diff = (out.astype(np.float64) - known.astype(np.float64)) / scale
        metrics[f"rmse_{name}"] = float(np.sqrt(np.mean(diff[hidden] ** 2)))  # over the generated entries only
    if info["kind"] == "images":
        metrics |= _completion_metrics(cfg, x, names, info, device)
        plots.metric_bars(EVAL_PLOT, {name: metrics[f"fid_{name}"] for name in names},
                          {name: metrics["fid_floor"] for name in names})
        return metrics
    if cfg.data.name == "gmm" and (mask == mask[:1]).all() and int((mask[0] == 0).sum()) == 1:
        g = cfg.data.gmm
        mixture = GaussianMixture.from_params(g.weights, g.means, g.covs)
        pits = {name: gmm_conditional_cdf(mixture, torch.from_numpy(out.astype(np.float64)),
                                          torch.from_numpy(mask[0])).numpy() for name, out in zip(names, x)}
        metrics |= {f"ks_{name}": float(stats.kstest(u, "uniform").statistic) for name, u in pits.items()}
        metrics["ks_critical"] = _ks_critical(len(x[0]))
        plots.pit_histograms(EVAL_PLOT, pits, {name: metrics[f"ks_{name}"] for name in names},
                             "PIT of the generated coordinate under the exact conditional (flat = exact)")
        return metrics
    reference = np.load(REFERENCE).astype(np.float64)
    for name, out in zip(names, x):
        metrics[f"cd_{name}"] = chamfer_clouds(out.astype(np.float64), reference[:len(out)], cfg.eval.cloud_size)
    plots.metric_bars(EVAL_PLOT, {name: metrics[f"cd_{name}"] for name in names}, {})
    return metrics


def _ks_critical(n: int, level: float = 0.05) -> float:
    """The Kolmogorov-Smirnov statistic a sample of n exact draws exceeds with probability `level`."""
    return float(stats.kstwo.ppf(1.0 - level, n))


def _rms(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """pipeline.edit.rms_distance of the stored outputs a, b (N, ...), in units of `scale` (255: pixels in [0, 1])."""
    as_float = lambda v: torch.from_numpy(v.astype(np.float64) / scale)  # noqa: E731
    return rms_distance(as_float(a), as_float(b)).numpy()


def _edit_metrics(cfg: Config, samples: dict, info: dict, device: str) -> dict:
    """Per t0: the mean RMS distance of the edits from their inputs (pixels in [0, 1]) and, for images, FID/KID
    against the reference split; a figure of both against t0."""
    x, inputs, times = samples["x"], samples["x_known"], [float(t) for t in samples["t0"]]
    scale = 255.0 if info["kind"] == "images" else 1.0
    names = [f"t0_{t:g}" for t in times]
    metrics = {f"distance_{name}": float(_rms(out, inputs, scale).mean()) for name, out in zip(names, x)}
    curves = {"RMS distance from the input": [metrics[f"distance_{name}"] for name in names]}
    if info["kind"] == "images":
        metrics |= _completion_metrics(cfg, x, names, info, device)
        curves["FID (against the reference split)"] = [metrics[f"fid_{name}"] for name in names]
    plots.metric_curves(EVAL_PLOT, times, curves, "t0 (fraction of the sampling walk)", "SDEdit")
    return metrics


def _interpolate_metrics(cfg: Config, samples: dict, info: dict, device: str) -> dict:
    """How evenly each row moves: the RMS distance between consecutive frames, averaged over rows, and its largest
    value over the even share of the endpoints' distance (1: evenly spaced frames; large: a jump)."""
    x = samples["x"]
    p, k = x.shape[:2]
    scale = 255.0 if info["kind"] == "images" else 1.0
    steps = np.stack([_rms(x[:, j + 1], x[:, j], scale) for j in range(k - 1)], axis=1)  # (P, K - 1)
    ends = _rms(x[:, -1], x[:, 0], scale)  # (P,)
    metrics = {"endpoint_distance": float(ends.mean()), "frame_distance": float(steps.mean()),
               "max_step_ratio": float((steps.max(1) / np.maximum(ends / (k - 1), 1e-12)).mean())}
    plots.metric_curves(EVAL_PLOT, list(range(1, k)), {"RMS distance to the previous frame": steps.mean(0).tolist()},
                        "frame", f"{samples['scheme']} interpolation: {p} rows")
    return metrics


TASK_METRICS = {"inpaint": _inpaint_metrics, "edit": _edit_metrics, "interpolate": _interpolate_metrics}


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    if cfg.method.name == "schrodinger_bridge":  # the ends and the coupling's cost (stages.bridge)
        from stages import bridge  # here: no other method's run loads it

        return bridge.evaluate_stage(cfg, run)
    e = cfg.eval
    info = data_record()
    samples = io.load_npz(SAMPLES)
    device = choose_device(cfg.train.device)
    images = info["kind"] == "images"
    task = cfg.sample.task
    if task != "generate":
        metrics = TASK_METRICS[task](cfg, samples, info, str(device))
        _task_neighbours(samples, info)
    else:
        gen, requested = samples["x"], samples.get("y")
        metrics = _image_metrics(cfg, gen, info, str(device), requested) if images else _point_metrics(cfg, gen)
        if requested is not None and not images:
            metrics["cond_accuracy"] = _point_cond_accuracy(cfg, gen[:len(requested)], requested)
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


def _task_neighbours(samples: dict, info: dict) -> None:
    """The memorisation figure of a task's outputs (the first output set)."""
    x = samples["x"]
    first = x.reshape(-1, *x.shape[2:])[:NEIGHBOUR_SAMPLES]
    train = np.load(TRAIN)
    idx = nearest_training(first.astype(train.dtype) if info["kind"] == "images" else first.astype(np.float32),
                           train if info["kind"] == "images" else train.astype(np.float32), NEIGHBOURS)
    if info["kind"] == "images":
        plots.nearest_neighbours(NEIGHBOURS_PLOT, first, train[idx],
                                 "each row: an output, then its nearest training images (pixel L2)")
    else:
        plots.nearest_points(NEIGHBOURS_PLOT, first.astype(np.float64), train[idx].astype(np.float64),
                             train.astype(np.float64), "outputs (orange) and their nearest training points (blue)")


if __name__ == "__main__":
    main("evaluate", evaluate_stage)
