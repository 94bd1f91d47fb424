"""distill: the model sample and evaluate load (models/final.pt), made from the ema stage's model.

With method.fm.reflow k > 0 (flow matching) it trains k reflows (Liu et al. 2023, sec. 2.2): flow j draws
method.fm.pairs (noise, sample) pairs from flow j − 1 (pipeline.reflow, written to outputs/reflow/pairs_<j>.npz)
and is trained on them with the reflow loss, starting from flow j − 1's weights and with train.*'s settings. With
distill.method cd or ect it then makes a consistency model of the model so far (pipeline.consistency: distillation
or easy consistency tuning), sampled with the consistency sampler. The last network's EMA weights are the final
model. With neither, the final model is the ema stage's, copied byte for byte.

Flow 0 is the train stage's: changing method.fm.reflow re-runs this stage and never the train stage. Each reflow
keeps its checkpoint in checkpoints/reflow_<j>/ (not an output, like train's), so going from k to k + 1 in the same
workspace resumes the finished reflows 1..k instead of training them again (their pairs are drawn again: the same
bits, a pure function of the flow, the seed and the batch size, pipeline.reflow).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline import io
from pipeline.config import Config
from pipeline.tracking import StageRun
from stages.common import (CHECKPOINTS, FINAL_MODEL, MODEL, NOISE_SCALES, REFLOW, TRAIN, data_record, main,
                           process_of, resolve)

if TYPE_CHECKING:
    from pipeline.train import TrainSettings

RECORD = REFLOW / "record.json"


class _Setup:
    """What every training of the stage shares: the data record, the process, the device, train.*'s resolved
    settings, the ema stage's model (spec, weights, and its file's sha256, which fingerprints the checkpoints)."""

    def __init__(self, cfg: Config, reflows: int):
        from pipeline import defaults
        from pipeline.devices import bf16_native
        from pipeline.train import settings_from
        from stages.launch import choose_device

        self.info, self.record = data_record(), io.read_json(NOISE_SCALES)
        self.process = process_of(self.record)
        self.device = choose_device(cfg.train.device)
        self.resolved = defaults.train_settings(cfg.train.model_dump(), self.info, bf16=bf16_native(self.device))
        self.settings = settings_from(cfg.train, self.resolved, cfg.seed, posthoc=False)
        model = io.load_torch(MODEL)
        self.spec, self.state = model["config"], model["state_dict"]
        self.model_sha256 = hashlib.sha256(MODEL.read_bytes()).hexdigest()
        self.reflows = reflows

    def fingerprint(self, cfg: Config, settings: TrainSettings, **extra) -> dict:
        """The checkpoint setup of one training here with `settings`: the model it starts from, the resolved
        settings (steps may change unless the lr decays over them)."""
        from pipeline.train import resolved_fingerprint

        return {"spec": self.spec, "process": self.record["process"], "model": self.model_sha256, "seed": cfg.seed,
                "resolved": resolved_fingerprint(self.resolved, settings), **extra}

    def network(self, state: dict, trainable: bool):
        """The model's network with `state` on the device: frozen (eval, no grad) or to be trained."""
        from pipeline import models

        net = models.build_network(self.spec, seed=0)
        net.load_state_dict(state)
        net.to(self.device)
        if not trainable:
            net.eval().requires_grad_(False)
        return net


def _reflow(cfg: Config, run: StageRun, s: _Setup, reflows: int) -> dict:
    """Train `reflows` flows in turn, each on the pairs of the one before; s.state becomes the last one's."""
    from pipeline import models
    from pipeline.losses import build_loss
    from pipeline.reflow import draw_pairs, stacked
    from pipeline.train import Checkpoints, Hooks, TrainData, train

    settings, process, device = s.settings, s.process, s.device
    n = resolve(cfg).family.reflow_pairs(cfg.method, int(s.info["n_train"]))
    loss = build_loss("reflow", process, "velocity")
    shape = tuple(s.info["shape"])
    rows = []
    for j in range(1, reflows + 1):
        _, velocity = models.network_fn(s.network(s.state, trainable=False), process, s.spec["parameterization"])
        z, x = draw_pairs(velocity, process, n, shape, cfg.seed + j, settings.batch_size, device, progress=True)
        pairs = REFLOW / f"pairs_{j}.npz"
        io.save_npz(pairs, z=z.numpy(), x=x.numpy())
        print(f"distill: reflow {j}/{reflows}: {n} pairs from flow {j - 1}, mean |x - z|^2 "
              f"{float((x - z).flatten(1).pow(2).sum(1).mean()):.4f}")
        # what a finished or interrupted reflow j must have been trained from to be resumed (steps may change)
        setup = s.fingerprint(cfg, settings, reflow=j,
                              pairs=hashlib.sha256(x.numpy().tobytes() + z.numpy().tobytes()).hexdigest())
        result = train(s.network(s.state, trainable=True), loss, TrainData(stacked(z, x)), settings,
                       Checkpoints(CHECKPOINTS / f"reflow_{j}", setup),
                       Hooks(on_log=lambda step, value, j=j: run.log_metric_buffered(f"reflow_{j}_loss", value, step),
                             progress=True), device=device)
        if result.resumed_from:
            print(f"distill: reflow {j} resumed from its checkpoint at step {result.resumed_from}")
        s.state = {k: v.detach().cpu() for k, v in result.ema.state_dict().items()}
        rows.append({"reflow": j, "pairs": n, "steps": settings.steps, "resumed_from": result.resumed_from,
                     "final_loss": result.loss_rows[-1][1] if result.loss_rows else None})
    return {"reflows": reflows, "runs": rows}


def _consistency(cfg: Config, run: StageRun, s: _Setup) -> dict:
    """A consistency model (pipeline.consistency: distillation or easy consistency tuning, distill.method) from
    s.state on the training data; s.state becomes the student's EMA weights. Its steps: distill.steps (auto:
    train's)."""
    import numpy as np
    import torch

    from pipeline import defaults, models
    from pipeline.consistency import consistency_loss
    from pipeline.kinds import kind_of
    from pipeline.samplers import FAST_DEFAULT_SPACING, spacing_of
    from pipeline.train import Checkpoints, Hooks, TrainData, train

    d, param = cfg.distill, s.spec["parameterization"]
    kind, fn = models.network_fn(s.network(s.state, trainable=False), s.process, param)
    steps = s.settings.steps if d.steps == "auto" else int(d.steps)
    loss = consistency_loss(d.method, s.process, fn, param, kind, d.num_scales,
                            spacing_of(FAST_DEFAULT_SPACING["consistency"], s.process), steps)
    settings = replace(s.settings, steps=steps, lr=defaults.distill_lr(d.lr, s.settings.lr, d.method))
    data_kind = kind_of(s.info, s.record.get("scaling"))
    data = TrainData(torch.from_numpy(np.load(TRAIN)), data_kind.batch_transform(cfg.data.dequantize, cfg.data.hflip))
    setup = s.fingerprint(cfg, settings, consistency=d.method, num_scales=d.num_scales, reflows=s.reflows,
                          lr=settings.lr)
    print(f"distill: consistency model by {d.method}, {steps} steps at lr {settings.lr:g}")
    result = train(s.network(s.state, trainable=True), loss, data, settings, Checkpoints(CHECKPOINTS / "consistency",
                   setup), Hooks(on_log=lambda step, value: run.log_metric_buffered("consistency_loss", value, step),
                                 progress=True), device=s.device)
    s.state = {k: v.detach().cpu() for k, v in result.ema.state_dict().items()}
    return {"method": d.method, "num_scales": d.num_scales, "steps": steps, "lr": settings.lr,
            "resumed_from": result.resumed_from,
            "final_loss": result.loss_rows[-1][1] if result.loss_rows else None}


def distill_stage(cfg: Config, run: StageRun) -> None:
    reflows = resolve(cfg).family.reflows(cfg.method)
    shutil.rmtree(REFLOW, ignore_errors=True)
    REFLOW.mkdir(parents=True)
    summary = {"reflows": reflows, "runs": []}
    if reflows or cfg.distill.method != "none":
        from pipeline import models

        setup = _Setup(cfg, reflows)
        if reflows:
            summary = _reflow(cfg, run, setup, reflows)
        if cfg.distill.method != "none":
            summary["consistency"] = _consistency(cfg, run, setup)
        models.save_model(FINAL_MODEL, setup.spec, setup.state)
        run.flush()
    else:
        with io.atomic_path(FINAL_MODEL) as tmp:  # the ema stage's model as it is: the same bytes, one cache object
            shutil.copyfile(MODEL, tmp)
    io.write_json(RECORD, summary)
    run.log_params({"reflows": reflows, "distill": cfg.distill.method})


if __name__ == "__main__":
    main("distill", distill_stage)
