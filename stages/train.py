"""train: fit the network with the method's loss (or write the exact GMM score for exact_score).

train.devices N > 1 runs N processes under torchrun (stages.launch.relaunch); each rank trains on its share of every
global batch and rank 0 alone writes and logs (pipeline.distributed, pipeline.train).
"""

from __future__ import annotations

import hashlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import defaults, io, models, plots
from pipeline.devices import bf16_native, set_tf32
from pipeline.kinds import kind_of
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.errors import DataError
from pipeline.guidance import guided_score
from pipeline.losses import build_loss
from pipeline.rng import SampleGenerators, sample_seed
from pipeline.samplers import draw
from pipeline.train import (Checkpoints, Hooks, Preempted, TrainData, check_train, eval_csv, settings_from,
                            fingerprinted_train, held_out_evaluator, loss_csv, resolved_fingerprint, stop_on_sigterm,
                            train)
from pipeline.tracking import StageRun
from stages.common import (CHECKPOINTS, EMA_MODEL, EVAL_CSV, LABELS, LOSS_CSV, NOISE_SCALES, RAW_MODEL, TEST, TRAIN,
                           TRAIN_METRICS, Resolved, data_record, main, process_of, publish_snapshots, resolve,
                           sampler_options)
from stages.launch import choose_device

# Held-out examples the training-time evaluation averages over, and images in its sample grid (train.eval_every).
EVAL_EXAMPLES, TRAIN_GRID = 512, 16
# The exit status of a preempted run: 128 + SIGTERM, what a shell reports for a process SIGTERM ended.
PREEMPTED_EXIT = 128 + signal.SIGTERM


def _log_sample_grid(r: Resolved, run: StageRun, net: torch.nn.Module, process, record: dict, info: dict,
                     device, step: int) -> None:
    """TRAIN_GRID samples of the network so far with the method's sampler, as a PNG on the stage's MLflow run."""
    cfg, plan = r.cfg, r.plan
    kind, fn = models.network_fn(net, process, plan.parameterization)
    if cfg.method.conditional:  # a conditional network is sampled with labels, as the sample stage does
        fn = guided_score(fn, defaults.sample_classes(cfg.sample.classes, TRAIN_GRID, info["num_classes"]).to(device),
                          cfg.sample.guidance)
    steps, options = sampler_options(r, process, record)
    out = draw(plan.sampler, kind, fn, process, (TRAIN_GRID, *info["shape"]), SampleGenerators(cfg.sample.seed,
               range(TRAIN_GRID)), steps, options, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"step_{step:07d}.png"
        plots.image_grid(path, kind_of(info, record["scaling"]).to_output(out.x), f"step {step}", nrow=4)
        run.log_artifact(path, "train_samples")


def _training_labels(cfg: Config, info: dict) -> Optional[torch.Tensor]:
    """The train split's 0-based classes (N,) for a class-conditional model (method.conditional), else None;
    refuses, before any training, data whose prepared record has fewer than two classes."""
    if not cfg.method.conditional:
        return None
    if info["num_classes"] < 2:
        raise DataError(f"method.conditional needs at least two classes; data.name: {cfg.data.name} was prepared "
                        f"with {info['num_classes']} (a folder needs class subfolders, a file data.labels_path)")
    return torch.from_numpy(np.load(LABELS["train"]))


def train_stage(cfg: Config, run: StageRun, group: Optional[Group] = None) -> None:
    """The train stage's body; with a `group` (torchrun, N > 1) one rank of it, rank 0 writing and logging."""
    t = cfg.train
    main_rank = group is None or group.is_main
    r = resolve(cfg)
    plan = r.plan
    run.log_params({"seed": cfg.seed, "method": cfg.method.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                    "train": t.model_dump(mode="json"), "loss": plan.loss, "parameterization": plan.parameterization})
    info = data_record()
    data = np.load(TRAIN)
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    kind = kind_of(info, record.get("scaling"))
    device = choose_device(t.device)
    resolved = defaults.train_settings(t.model_dump(), info, bf16=bf16_native(device))
    labels = _training_labels(cfg, info)
    spec = defaults.network_spec(cfg.model.model_dump(), info, plan.parameterization,
                                 num_classes=info["num_classes"] if labels is not None else 0)
    # the family's wrapper around the network (EDM's preconditioning), which may measure the data in model units
    spec, extra = r.family.network_spec(spec, cfg.method, lambda: kind.to_model(data))
    options = r.family.loss_options(plan.loss, cfg.method, kind.decoder()) | extra
    loss = build_loss(plan.loss, process, plan.parameterization, **options)
    check_train(t, resolved["batch_size"], plan.loss, group.world_size if group else 1)
    settings = settings_from(cfg.train, resolved, cfg.seed)
    # Everything that must match for a checkpoint to be resumed; steps, logging and the device may change.
    setup = {"spec": spec, "process": record["process"], "loss": plan.loss, "options": options, "seed": cfg.seed,
             "data": hashlib.sha256(data.tobytes()).hexdigest(),
             "resolved": resolved_fingerprint(resolved, settings),
             "augment": kind.augmentation(cfg.data.dequantize, cfg.data.hflip),
             "train": fingerprinted_train(t)}
    if labels is not None:  # only then, so unconditional checkpoints keep their fingerprint
        setup["labels"] = {"sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                           "label_dropout": cfg.method.label_dropout}
    set_tf32(device, t.tf32)
    net = models.build_network(spec, seed=cfg.seed)
    # Dropout draws from the global RNG: seeded here, so the masks are the same in every run (and each rank its
    # own under torchrun); a resume restores the state the checkpoint saved.
    torch.manual_seed(sample_seed(cfg.seed, group.rank if group is not None else 0))
    transform = kind.batch_transform(cfg.data.dequantize, cfg.data.hflip)
    evaluator, unit = None, "none"
    if t.eval_every and main_rank:  # rank 0 alone evaluates, logs and writes the rows
        held_out = torch.from_numpy(np.load(TEST)[:EVAL_EXAMPLES])
        held_out_labels = torch.from_numpy(np.load(LABELS["test"])[:EVAL_EXAMPLES]) if labels is not None else None
        held_out_eval, unit = held_out_evaluator(loss, plan.loss, held_out, transform=transform, device=device,
                                                 seed=cfg.seed, scaling=kind.scaling,
                                                 labels=held_out_labels)

        def log_held_out(step: int, ema_net: torch.nn.Module) -> dict:
            row = held_out_eval(step, ema_net)
            run.log_metrics({"held_out": row["value"], "held_out_se": row["se"]}, step=step)
            if kind.shows_samples:  # a small grid of the EMA network's samples, to MLflow only (the DVC record is
                # the curve)
                _log_sample_grid(r, run, ema_net, process, record, info, device, step)
            return row
        evaluator = log_held_out
    try:
        with stop_on_sigterm() as should_stop:
            result = train(net, loss, TrainData(torch.from_numpy(data), transform, labels, cfg.method.label_dropout),
                           settings, Checkpoints(CHECKPOINTS, setup),
                           Hooks(on_log=lambda step, loss: run.log_metric_buffered("train_loss", loss, step),
                                 evaluator=evaluator, eval_every=t.eval_every, should_stop=should_stop,
                                 progress=main_rank),
                           device=device, group=group)
    except Preempted as stop:
        if not main_rank:
            raise SystemExit(PREEMPTED_EXIT) from None
        run.log_metrics({"preempted_at": stop.step}, step=stop.step)
        print(f"train: SIGTERM: stopped at step {stop.step} and wrote {stop.checkpoint}; run the stage again to "
              f"resume from it (exit {PREEMPTED_EXIT})", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT) from None
    if not main_rank:
        return
    if result.resumed_from:
        print(f"train: resumed from the checkpoint at step {result.resumed_from}")
    models.save_model(RAW_MODEL, spec, result.model.state_dict())
    models.save_model(EMA_MODEL, spec, result.ema.state_dict())
    publish_snapshots(Checkpoints(CHECKPOINTS, setup).snapshots)
    io.write_text(LOSS_CSV, loss_csv(result.loss_rows))
    io.write_text(EVAL_CSV, eval_csv(result.eval_rows, unit))
    final = result.loss_rows[-1][1] if result.loss_rows else None
    num_params = sum(p.numel() for p in net.parameters())
    metrics = {"steps": resolved["steps"], "num_params": num_params, "final_loss": final,
               **kind.train_record(resolved, spec.get("net", spec)["kind"])}  # MLflow: every run's resolved values
    io.write_json(TRAIN_METRICS, metrics)
    run.flush()
    run.log_params({"resolved": {**resolved, "arch": spec.get("net", spec)["kind"], "device": str(device),
                                 "world_size": group.world_size if group else 1}})
    run.log_metrics({"final_loss": final, "num_params": num_params, "resumed_from": result.resumed_from})


if __name__ == "__main__":
    main("train", train_stage)
