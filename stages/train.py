"""train: fit the network with the method's loss (or write the exact GMM score for exact_score)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline import io, models
from pipeline.config import Config
from pipeline.gmm import GaussianMixture
from pipeline.losses import build_loss
from pipeline.methods import loss_options
from pipeline.train import TrainSettings, train
from pipeline.tracking import StageRun
from stages.common import (CHECKPOINTS, EMA_MODEL, LOSS_CSV, NOISE_SCALES, RAW_MODEL, TRAIN, TRAIN_METRICS, main, plan_of,
                           process_of)


def _write_curve(rows: list[tuple[int, float]]) -> None:
    io.write_text(LOSS_CSV, "step,loss\n" + "".join(f"{s},{v:.8g}\n" for s, v in rows))


def train_stage(cfg: Config, run: StageRun) -> None:
    t = cfg.train
    plan = plan_of(cfg)
    run.log_params({"seed": cfg.seed, "method": cfg.method.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                    "train": t.model_dump(mode="json"), "loss": plan.loss, "parameterization": plan.parameterization})
    if plan.loss is None:
        g = cfg.data.gmm
        exact = models.gmm_model_file(GaussianMixture.from_params(g.weights, g.means, g.covs))
        for path in (RAW_MODEL, EMA_MODEL):
            io.save_torch(path, exact)
        _write_curve([])
        io.write_json(TRAIN_METRICS, {"steps": 0, "num_params": 0, "final_loss": None})
        CHECKPOINTS.mkdir(exist_ok=True)
        return

    data = np.load(TRAIN)
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    spec = {"kind": "mlp", "dim": int(np.prod(data.shape[1:])), "hidden": cfg.model.hidden, "blocks": cfg.model.blocks,
            "emb_dim": cfg.model.emb_dim, "parameterization": plan.parameterization}
    options = loss_options(plan.loss, cfg.method.weighting, cfg.method.t_sampling)
    loss = build_loss(plan.loss, process, plan.parameterization, **options)
    settings = TrainSettings(t.steps, t.batch_size, t.lr, t.grad_clip, t.ema_decay, t.checkpoint_every, t.log_every, cfg.seed)
    # Everything that must match for a checkpoint to be resumed; steps and logging cadence may change.
    setup = {"spec": spec, "process": record["process"], "loss": plan.loss, "options": options, "seed": cfg.seed,
             "data": hashlib.sha256(data.tobytes()).hexdigest(),
             "train": t.model_dump(exclude={"steps", "checkpoint_every", "log_every", "ema"})}
    net = models.build_network(spec, seed=cfg.seed)
    result = train(net, loss, torch.from_numpy(data), settings,
                   CHECKPOINTS, setup, on_log=lambda step, loss: run.log_metric_buffered("train_loss", loss, step))
    if result.resumed_from:
        print(f"train: resumed from the checkpoint at step {result.resumed_from}")
    models.save_model(RAW_MODEL, spec, result.model.state_dict())
    models.save_model(EMA_MODEL, spec, result.ema.state_dict())
    _write_curve(result.loss_rows)
    final = result.loss_rows[-1][1] if result.loss_rows else None
    num_params = sum(p.numel() for p in net.parameters())
    io.write_json(TRAIN_METRICS, {"steps": t.steps, "num_params": num_params, "final_loss": final})
    run.flush()
    run.log_metrics({"final_loss": final, "num_params": num_params, "resumed_from": result.resumed_from})


if __name__ == "__main__":
    main("train", train_stage)
