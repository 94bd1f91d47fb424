"""Consistency distillation's learning rate on a finished 2-D flow-matching run: the 1- and 2-step cd of the
student (raw and EMA weights) after distill.num_scales N and a number of steps, for each lr; the study behind
pipeline.defaults.DISTILL_LR_FACTOR["cd"].

    python -m benchmarks.distill_lr RUN_DIR [--lr 1e-3 1e-4 3e-5 1e-5] [--steps 5000] [--num-scales 18]

RUN_DIR: a run's workspace after `dvc exp run -S method.name=flow_matching` (its models/model.pt, data/ and
outputs/noise_scales.json). The loop is the distill stage's loss with a plain Adam and an EMA of 0.999 (the
points' train.ema_decay), batch 512, 2,000 samples scored against the first 2,000 test points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def distil(run: Path, lr: float, steps: int, num_scales: int, batch: int = 512, ema: float = 0.999) -> dict:
    from pipeline import io, models
    from pipeline.consistency import ConsistencyDistillationLoss, distillation_grid
    from pipeline.metrics.pointcloud import chamfer_clouds
    from pipeline.processes import process_from_spec
    from pipeline.rng import SampleGenerators
    from pipeline.samplers import draw, spacing_of

    process = process_from_spec(json.loads((run / "outputs" / "noise_scales.json").read_text())["process"])
    obj = io.load_torch(run / "models" / "model.pt")
    spec, state = obj["config"], obj["state_dict"]
    param = spec["parameterization"]
    data = torch.from_numpy(np.load(run / "data" / "train.npy")).float()
    test = np.load(run / "data" / "test.npy")[:2000].astype(np.float64)

    def network():
        net = models.build_network(spec, seed=0)
        net.load_state_dict(state)
        return net

    kind, teacher = models.network_fn(network().eval().requires_grad_(False), process, param)
    field = "velocity" if kind == "velocity" else "score"
    torch.manual_seed(0)
    student = network()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    avg = torch.optim.swa_utils.AveragedModel(student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema))
    grid = distillation_grid(process, num_scales, spacing_of("karras", process))
    loss = ConsistencyDistillationLoss(process, teacher, param, grid, field=field)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        value = loss(student, data[torch.randint(len(data), (batch,), generator=g)], generator=g).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        avg.update_parameters(student)
    row = {"lr": lr, "steps": steps, "num_scales": num_scales, "train_s": round(time.perf_counter() - start, 1)}
    for net, name in ((student, "raw"), (avg.module, "ema")):
        _, fn = models.network_fn(net.eval(), process, param)
        for k in (1, 2):
            with torch.no_grad():
                x = draw("consistency", kind, fn, process, (2000, 2), SampleGenerators(1, range(2000)), k,
                         {"spacing": "auto"}).x
            row[f"cd_{name}_{k}"] = round(chamfer_clouds(x.numpy().astype(np.float64), test), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-3, 1e-4, 3e-5, 1e-5])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--num-scales", type=int, default=18)
    args = parser.parse_args()
    for lr in args.lr:
        print(json.dumps(distil(args.run.resolve(), lr, args.steps, args.num_scales)), flush=True)


if __name__ == "__main__":
    main()
