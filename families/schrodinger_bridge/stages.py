"""The train, sample and evaluate bodies of method.name: schrodinger_bridge (bridge.py and solvers.py beside this).

The source is data.name's splits (data/*.npy), the target data.target's (data/target.npz); the reference process is
in outputs/noise_scales.json. train fits the forward and backward drifts with method.sb.solver and logs cd / emd at
both ends after every iteration; sample walks sample.direction from the held-out points of its start end; evaluate
compares the ends with the other end's held-out points and the coupling's cost with POT's entropic plan.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from families.schrodinger_bridge import FAMILY
from pipeline import defaults, io, plots
from families.schrodinger_bridge.bridge import DIRECTIONS, coupling_cost, denoised_variance, opposite, sinkhorn_cost, transport
from families.schrodinger_bridge.solvers import BridgeSettings, load_bridge, model_file, train_bridge
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.metrics import pointcloud_metrics
from pipeline.metrics.images import nearest_training
from pipeline.models import build_network
from pipeline.rng import SampleGenerators, sample_seed
from pipeline.tracking import StageRun
from stages.common import (EMA_MODEL, EVAL_CSV, EVAL_METRICS, EVAL_PLOT, LOSS_CSV, MODEL, NEIGHBOURS_PLOT,
                           NOISE_SCALES, RAW_MODEL, REFERENCE, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TARGET, TEST,
                           TRAIN, TRAIN_METRICS, TRAJECTORY_PLOT, data_record, process_of, publish_snapshots)
from stages.launch import choose_device

# Updates of each network per half-iteration when train.steps is 'auto'.
AUTO_STEPS_PER_HALF = 2_000
# The per-iteration check during training: this many held-out points walked each way, EMD on the first EVAL_EMD.
EVAL_POINTS, EVAL_EMD = 2_000, 1_000
# Paths drawn in the trajectory figure.
PATHS_SHOWN = 64


def _splits() -> dict[str, dict[str, np.ndarray]]:
    """{"source": {split: (n, D)}, "target": {...}}: the points at t = 0 and t = 1."""
    info = data_record()
    target = io.load_npz(TARGET)  # its own file, so that data/record.json (read by every stage) stays the source's
    if info["kind"] != "points" or not target:
        raise DataError("method.name: schrodinger_bridge needs two point sets: re-run prepare with data.target set "
                        f"(the prepared data are {info['kind']}{'' if target else ', with no target'})")
    source = {k: np.load(p) for k, p in (("train", TRAIN), ("test", TEST), ("reference", REFERENCE))}
    return {"source": source, "target": {k: target[k] for k in ("train", "test", "reference")}}


def _end(direction: str) -> str:
    """The data set a walk in `direction` ends at."""
    return "target" if direction == "forward" else "source"


def _start(direction: str) -> str:
    return _end(opposite(direction))


def _steps_per_half(cfg: Config) -> int:
    t, sb = cfg.train, FAMILY.sb(cfg.method)
    if t.steps == "auto":
        return AUTO_STEPS_PER_HALF
    per_half = t.steps // (2 * sb.iterations)
    if per_half < 1:
        raise DataError(f"train.steps ({t.steps}) must be at least 2 x method.sb.iterations ({2 * sb.iterations}): "
                        "each iteration trains the backward and then the forward network")
    return per_half


def _end_metrics(gen: np.ndarray, test: np.ndarray, reference: np.ndarray, cloud_size: int, emd_n: int) -> dict:
    n = len(gen)
    as64 = lambda v: v[:n].astype(np.float64).reshape(n, -1)  # noqa: E731
    return pointcloud_metrics(as64(gen), as64(test), as64(reference), cloud_size=min(cloud_size, n),
                              emd_n=min(emd_n, n))


def train_stage(cfg: Config, run: StageRun) -> None:
    t, sb = cfg.train, FAMILY.sb(cfg.method)
    data = _splits()
    process = process_of(io.read_json(NOISE_SCALES))
    resolved = defaults.train_settings(t.model_dump(), data_record())
    settings = BridgeSettings(sb.solver, sb.iterations, _steps_per_half(cfg), resolved["batch_size"], resolved["lr"],
                              sb.num_steps, cfg.seed, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
                              log_every=t.log_every)
    spec = defaults.network_spec(cfg.model.model_dump(), data_record(), "drift")
    networks = {d: build_network(spec, seed=sample_seed(cfg.seed, i)) for i, d in enumerate(DIRECTIONS)}
    device = choose_device(t.device)
    for net in networks.values():
        net.to(device)
    ends = {k: torch.from_numpy(v["train"]).float().to(device) for k, v in data.items()}
    held_out = {k: torch.from_numpy(v["test"][:EVAL_POINTS]).float().to(device) for k, v in data.items()}
    run.log_params({"seed": cfg.seed, "method": cfg.method.model_dump(mode="json"),
                    "model": cfg.model.model_dump(mode="json"), "train": t.model_dump(mode="json"),
                    "resolved": {"steps_per_half": settings.steps, "batch_size": settings.batch_size,
                                 "lr": settings.lr, "device": str(device)}})

    def evaluate(iteration: int, step: int, ema: dict) -> dict:
        row = {}
        for direction in DIRECTIONS:
            x = held_out[_start(direction)]
            out = transport(ema[direction], process, x, direction, sb.num_steps,
                            SampleGenerators(cfg.seed, range(len(x))), denoise=cfg.sample.denoise)
            end = data[_end(direction)]
            found = _end_metrics(out.x.cpu().numpy(), end["test"], end["reference"], cfg.eval.cloud_size, EVAL_EMD)
            row |= {f"{k}_{_end(direction)}": found[k] for k in ("cd", "cd_floor", "emd", "emd_floor")}
        run.log_metrics({f"iteration_{k}": v for k, v in row.items()}, step=iteration)
        print(f"train: iteration {iteration}: cd at the target {row['cd_target']:.4f} (floor "
              f"{row['cd_floor_target']:.4f}), at the source {row['cd_source']:.4f} "
              f"(floor {row['cd_floor_source']:.4f})")
        return row

    result = train_bridge(networks, process, ends["source"], ends["target"], settings, evaluate=evaluate,
                          on_log=lambda step, loss, d: run.log_metric_buffered(f"train_loss_{d}", loss, step),
                          progress=True)
    io.save_torch(RAW_MODEL, model_file({d: spec for d in DIRECTIONS}, result.nets, process, sb.num_steps))
    io.save_torch(EMA_MODEL, model_file({d: spec for d in DIRECTIONS}, result.ema, process, sb.num_steps))
    publish_snapshots(None)  # the bridge's own loop keeps the decay EMA only
    io.write_text(LOSS_CSV, "step,loss,network,iteration\n" + "".join(f"{s},{v:.8g},{d},{i}\n"
                                                                      for s, v, d, i in result.loss_rows))
    columns = ("cd_source", "emd_target", "emd_source")
    io.write_text(EVAL_CSV, "step,value,se,unit,iteration," + ",".join(columns) + "\n" + "".join(
        f"{r['step']},{r['cd_target']:.8g},0,cd_target,{r['iteration']}," + ",".join(f"{r[c]:.8g}" for c in columns)
        + "\n" for r in result.eval_rows))
    final = result.eval_rows[-1]
    num_params = sum(p.numel() for net in networks.values() for p in net.parameters())
    io.write_json(TRAIN_METRICS, {"steps": 2 * settings.iterations * settings.steps, "num_params": num_params,
                                  "final_loss": result.loss_rows[-1][1] if result.loss_rows else None,
                                  **{k: v for k, v in final.items() if k not in ("step", "iteration")}})
    run.flush()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "iterations.png"
        iterations = [r["iteration"] for r in result.eval_rows]
        plots.metric_curves(path, iterations, {k: [r[k] for r in result.eval_rows] for k in
                                               ("cd_target", "cd_source", "emd_target", "emd_source")},
                            "iteration", f"Schrödinger bridge ({sb.solver}): each end after each iteration")
        run.log_artifact(path)


def sample_stage(cfg: Config, run: StageRun) -> None:
    s = cfg.sample
    direction = s.direction
    start = _splits()[_start(direction)]["test"]
    n = defaults.POINT_SIZES if s.n == "auto" else s.n
    if n > len(start):
        raise DataError(f"sample.n ({n}) is more than the {len(start)} held-out points of the {_start(direction)} "
                        f"the {direction} walk starts from; lower sample.n")
    batch_size = n if s.batch_size == "auto" else s.batch_size
    device = choose_device(cfg.train.device)
    process, num_steps, drifts = load_bridge(MODEL, device=device)
    chunks, nfe, paths = [], 0, None
    with torch.no_grad():
        for first in range(0, n, batch_size):
            rows = range(first, min(first + batch_size, n))
            x = torch.from_numpy(start[rows.start:rows.stop]).float().to(device)
            out = transport(drifts[direction], process, x, direction, num_steps, SampleGenerators(s.seed, rows),
                            denoise=s.denoise, record=num_steps + 1 if first == 0 else None, progress=True)
            if not torch.isfinite(out.x).all():
                raise FloatingPointError("the bridge's walk diverged: non-finite points (more method.sb.num_steps?)")
            chunks.append(out.x.cpu().numpy())
            if paths is None:
                paths = np.stack([v[:PATHS_SHOWN].cpu().numpy() for _, v in out.trajectory], axis=1)
            nfe = max(nfe, out.nfe)
    x = np.concatenate(chunks).astype(np.float32)
    # The variance of the noise the denoised last step left out: evaluate adds it back to the coupling's cost.
    left_out = denoised_variance(process, num_steps, direction) if s.denoise else 0.0
    io.save_npz(SAMPLES, x=x, x_start=start[:n].astype(np.float32), denoised_variance=np.array(left_out))
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": n})
    end = _splits()[_end(direction)]["test"]
    title = f"Schrödinger bridge, {direction}: {_start(direction)} -> {_end(direction)}, nfe={nfe}"
    plots.scatter_samples(SAMPLES_PLOT, x, end[:n], title)
    plots.bridge_paths(TRAJECTORY_PLOT, paths, start[:n], end[:n], f"{title}: {len(paths)} paths")
    run.log_params({"sample": s.model_dump(mode="json"), "sampler": "bridge", "n": n, "batch_size": batch_size})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)
    run.log_artifact(TRAJECTORY_PLOT)


def evaluate_stage(cfg: Config, run: StageRun) -> None:
    e, direction = cfg.eval, cfg.sample.direction
    samples = io.load_npz(SAMPLES)
    x, x_start = samples["x"], samples["x_start"]
    n = defaults.POINT_SIZES if e.n == "auto" else e.n
    if len(x) < n:
        raise DataError(f"samples.npz holds {len(x)} points but eval.n is {n}; re-run sample")
    end = _splits()[_end(direction)]
    metrics = _end_metrics(x[:n], end["test"], end["reference"], e.cloud_size, e.emd_n)
    # The cost of the walk's own coupling, its noisy last step included (a denoised step's noise put back).
    metrics["ot_cost"] = coupling_cost(x_start[:n], x[:n], float(samples["denoised_variance"]))
    sinkhorn: Optional[float] = None
    sb = FAMILY.sb(cfg.method)
    if sb.reference == "brownian":  # the entropic plan is the bridge's for Brownian motion only
        m = min(e.ot_n, n)
        sinkhorn = sinkhorn_cost(x_start[:m], end["test"][:m], sb.sigma)
        metrics |= {"ot_cost_sinkhorn": sinkhorn, "ot_cost_gap": abs(metrics["ot_cost"] - sinkhorn) / sinkhorn,
                    "ot_n": m}
    plots.density_comparison(EVAL_PLOT, x[:n].astype(np.float64), end["test"][:n].astype(np.float64),
                             f"at the {_end(direction)}: cd {metrics['cd']:.4f} (floor {metrics['cd_floor']:.4f}), "
                             f"ot_cost {metrics['ot_cost']:.3f}"
                             + (f" (Sinkhorn {sinkhorn:.3f})" if sinkhorn is not None else ""))
    train = end["train"].astype(np.float32)
    idx = nearest_training(x[:8].astype(np.float32), train, 8)
    plots.nearest_points(NEIGHBOURS_PLOT, x[:8].astype(np.float64), train[idx].astype(np.float64),
                         train.astype(np.float64), f"walked points (orange) and their nearest {_end(direction)} "
                         "training points (blue)")
    io.write_json(EVAL_METRICS, metrics)
    run.log_params({"eval": e.model_dump(mode="json"), "direction": direction})
    run.log_metrics(metrics)
    run.log_artifact(EVAL_PLOT)
    run.log_artifact(NEIGHBOURS_PLOT)
