"""distill: the model sample and evaluate load (models/final.pt), made from the ema stage's model.

With method.fm.reflow k > 0 (flow matching) it trains k reflows (Liu et al. 2023, sec. 2.2): flow j draws
method.fm.pairs (noise, sample) pairs from flow j − 1 (pipeline.reflow, written to outputs/reflow/pairs_<j>.npz)
and is trained on them with the reflow loss, starting from flow j − 1's weights and with train.*'s settings; the
last one's EMA weights are the final model. Otherwise the final model is the ema stage's, copied byte for byte.

Flow 0 is the train stage's: changing method.fm.reflow re-runs this stage and never the train stage. Each reflow
keeps its checkpoint in checkpoints/reflow_<j>/ (not an output, like train's), so going from k to k + 1 in the same
workspace resumes the finished reflows 1..k instead of training them again (their pairs are drawn again: the same
bits, a pure function of the flow, the seed and the batch size, pipeline.reflow).
"""

from __future__ import annotations

import hashlib
import shutil

from pipeline import io
from pipeline.config import Config
from pipeline.tracking import StageRun
from stages.common import (CHECKPOINTS, FINAL_MODEL, MODEL, NOISE_SCALES, REFLOW, data_record, main, process_of,
                           resolve)

RECORD = REFLOW / "record.json"


def _reflow(cfg: Config, run: StageRun, reflows: int) -> dict:
    """Train `reflows` flows in turn, each on the pairs of the one before; write the last as FINAL_MODEL."""
    from pipeline import defaults, models
    from pipeline.devices import bf16_native
    from pipeline.losses import build_loss
    from pipeline.reflow import draw_pairs, stacked
    from pipeline.train import Checkpoints, Hooks, TrainData, settings_from, train
    from stages.launch import choose_device

    r, info = resolve(cfg), data_record()
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    device = choose_device(cfg.train.device)
    resolved = defaults.train_settings(cfg.train.model_dump(), info, bf16=bf16_native(device))
    settings = settings_from(cfg.train, resolved, cfg.seed, posthoc=False)
    n = r.family.reflow_pairs(cfg.method, int(info["n_train"]))
    teacher = io.load_torch(MODEL)
    spec, state = teacher["config"], teacher["state_dict"]
    flow0 = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    loss = build_loss("reflow", process, "velocity")
    shape = tuple(info["shape"])
    rows = []
    for j in range(1, reflows + 1):
        net = models.build_network(spec, seed=cfg.seed)
        net.load_state_dict(state)
        net.to(device).eval().requires_grad_(False)
        _, velocity = models.network_fn(net, process, spec["parameterization"])
        z, x = draw_pairs(velocity, process, n, shape, cfg.seed + j, settings.batch_size, device, progress=True)
        pairs = REFLOW / f"pairs_{j}.npz"
        io.save_npz(pairs, z=z.numpy(), x=x.numpy())
        print(f"distill: reflow {j}/{reflows}: {n} pairs from flow {j - 1}, mean |x - z|^2 "
              f"{float((x - z).flatten(1).pow(2).sum(1).mean()):.4f}")
        net.requires_grad_(True)
        # what a finished or interrupted reflow j must have been trained from to be resumed (steps may change)
        setup = {"spec": spec, "process": record["process"], "flow0": flow0, "reflow": j, "seed": cfg.seed,
                 "pairs": hashlib.sha256(x.numpy().tobytes() + z.numpy().tobytes()).hexdigest(),
                 "resolved": {**{k: v for k, v in resolved.items() if k != "snapshot_every"}, "steps": None}}
        result = train(net, loss, TrainData(stacked(z, x)), settings, Checkpoints(CHECKPOINTS / f"reflow_{j}", setup),
                       Hooks(on_log=lambda step, value, j=j: run.log_metric_buffered(f"reflow_{j}_loss", value, step),
                             progress=True), device=device)
        if result.resumed_from:
            print(f"distill: reflow {j} resumed from its checkpoint at step {result.resumed_from}")
        state = {k: v.detach().cpu() for k, v in result.ema.state_dict().items()}
        rows.append({"reflow": j, "pairs": n, "steps": settings.steps, "resumed_from": result.resumed_from,
                     "final_loss": result.loss_rows[-1][1] if result.loss_rows else None})
    models.save_model(FINAL_MODEL, spec, state)
    run.flush()
    return {"reflows": reflows, "runs": rows}


def distill_stage(cfg: Config, run: StageRun) -> None:
    reflows = resolve(cfg).family.reflows(cfg.method)
    shutil.rmtree(REFLOW, ignore_errors=True)
    REFLOW.mkdir(parents=True)
    if reflows:
        summary = _reflow(cfg, run, reflows)
    else:
        with io.atomic_path(FINAL_MODEL) as tmp:  # the ema stage's model as it is: the same bytes, one cache object
            shutil.copyfile(MODEL, tmp)
        summary = {"reflows": 0, "runs": []}
    io.write_json(RECORD, summary)
    run.log_params({"reflows": reflows})


if __name__ == "__main__":
    main("distill", distill_stage)
