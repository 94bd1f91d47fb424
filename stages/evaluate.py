"""evaluate: metrics against held-out data, each next to its floor; likelihoods.

The metrics of the data's kind (pipeline.kinds): chamfer and earth mover's distances of point sets; FID and KID
(clean-fid) with FID's bootstrap interval, precision / recall / density / coverage, fid_domain and the class
histogram (the classifier stage's network) of image sets. For every kind: the nearest training items of a few
outputs (memorisation check) and, of generated samples, the memorised fraction; the metrics of sample.task's
outputs; the likelihoods of the method (eval.likelihood)."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch

from pipeline import io, models
from pipeline.config import Config
from pipeline.gmm import likelihood_gaps
from pipeline.kinds import NEIGHBOUR_SAMPLES, DataKind, Evaluation, Files, kind_of, known_mixture
from pipeline.likelihood import model_likelihoods
from pipeline.tracking import StageRun
from stages.common import (CLASSIFIER, CLASSIFIER_METRICS, DOMAIN_REFERENCE, EVAL_METRICS, EVAL_PLOT, FID_METRICS,
                           FID_REFERENCE, LABELS, FINAL_MODEL, NEIGHBOURS_PLOT, NOISE_SCALES, REFERENCE, SAMPLES, TEST, TRAIN,
                           Resolved, data_record, main, process_of, resolve)
from stages.launch import choose_device

# The stored inputs of the metrics by name (pipeline.kinds.Files), each read on first use.
READERS = {"train": (np.load, TRAIN), "test": (np.load, TEST), "reference": (np.load, REFERENCE),
           **{f"{split}_labels": (np.load, path) for split, path in LABELS.items()},
           "fid_reference": (io.load_npz, FID_REFERENCE), "domain_reference": (io.load_npz, DOMAIN_REFERENCE),
           "fid_metrics": (io.read_json, FID_METRICS), "classifier_metrics": (io.read_json, CLASSIFIER_METRICS),
           "classifier": (io.load_torch, CLASSIFIER)}

# Each sample.task's metrics of samples.npz.
TASK_METRICS: dict[str, Callable[[DataKind, dict, Evaluation], dict]] = {
    "generate": lambda data, s, ev: data.generated_metrics(s["x"], s.get("y"), ev) | data.memorisation(s["x"], ev),
    "inpaint": lambda data, s, ev: data.inpaint_metrics(s["x"], s["x_known"], s["mask"],
                                                        [str(m) for m in s["methods"]], ev),
    "inverse": lambda data, s, ev: data.inverse_metrics(s["x"], s["x_known"], s["y"], json.loads(str(s["operator"])),
                                                        s.get("mask"), [str(m) for m in s["methods"]], ev),
    "edit": lambda data, s, ev: data.edit_metrics(s["x"], s["x_known"], [float(t) for t in s["t0"]], ev),
    "interpolate": lambda data, s, ev: data.interpolate_metrics(s["x"], s["scheme"], ev)}


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    e, r, task = cfg.eval, resolve(cfg), cfg.sample.task
    record = io.read_json(NOISE_SCALES)
    data = kind_of(data_record(), record.get("scaling"))
    device = choose_device(cfg.train.device)
    ev = Evaluation(Files(READERS), e, str(device), known_mixture(cfg.data), EVAL_PLOT)
    samples = io.load_npz(SAMPLES)
    metrics = TASK_METRICS[task](data, samples, ev)
    # the memorisation figure: the first samples, or a task's first outputs (its first output set first)
    shown = samples["x"].reshape(-1, *data.shape)[:NEIGHBOUR_SAMPLES]
    data.neighbours_figure(NEIGHBOURS_PLOT, shown, ev.files["train"], "sample" if task == "generate" else "output")
    if e.likelihood:
        metrics.update(_likelihoods(r, data, record, device, ev))
    io.write_json(EVAL_METRICS, metrics)
    run.log_params({"eval": e.model_dump(mode="json")} | {k: v for k, v in metrics.items() if isinstance(v, str)})
    run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, (str, dict))})
    run.log_artifact(EVAL_PLOT)
    run.log_artifact(NEIGHBOURS_PLOT)


def _likelihoods(r: Resolved, data: DataKind, record: dict, device: torch.device, ev: Evaluation) -> dict:
    """The method's likelihoods of the first eval.likelihood_n test items; on data with an exact mixture, their gaps
    to the true likelihood."""
    e, process = ev.settings, process_of(record)
    kind, fn = models.load_model(FINAL_MODEL, process, dtype=torch.float64, device=device)
    x = data.likelihood_input(ev.files["test"][: e.likelihood_n]).to(device)
    found = model_likelihoods(kind, fn, process, x, ode=r.plan.ode, elbo=r.plan.elbo, divergence=e.divergence,
                              rtol=e.rtol, atol=e.atol, elbo_slices=e.elbo_slices, elbo_variance=e.elbo_variance,
                              generator=torch.Generator().manual_seed(e.seed), scaling=data.scaling)
    return found | (likelihood_gaps(ev.mixture, x, found) if ev.mixture is not None else {})


if __name__ == "__main__":
    main("evaluate", evaluate_stage)
