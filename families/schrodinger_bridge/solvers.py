"""Training a Schrödinger bridge: IPF with mean matching (De Bortoli et al. 2021) or bridge matching (DSBM, Shi et al.
2023), and the bridge's model file.

Both solvers alternate half-iterations: the backward network is fitted to paths walked forward with the current
forward drift, then the forward network to paths walked backward, and so on (families.schrodinger_bridge.bridge has the drifts and the
targets). They differ in what they take from the other direction's walk:

- ipf: every step of the path, each with its mean-matching target; the first forward walk is the reference itself.
  The fixed point of these half-steps is the Schrödinger bridge (De Bortoli et al. 2021, sec. 3; Chen et al. 2022,
  arXiv:2110.11291, reach the same fixed point by likelihood training).
- dsbm: only the path's two ends, a coupling; the network fits the drift of the reference's bridges between them
  (a Markovian projection of the coupling's reciprocal process). Shi et al. 2023, Alg. 1, alternating the forward
  and backward fits, started from the independent coupling p0 x p1 as their DSBM-IMF is: every iterate then keeps
  both marginals. (Started from the reference's coupling it would repeat IPF's iterates, their DSBM-IPF.)

Each half-iteration regresses the drift on rows (x, t, target) redrawn every `refresh` updates from `paths` walks
(or couplings); the walks use the other network's EMA, as De Bortoli et al.'s cache does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pipeline import io, nets
from families.schrodinger_bridge.bridge import (DIRECTIONS, Drift, bridge_sample, bridge_targets, mean_matching_targets, opposite,
                             time_grid, transport)
from pipeline.processes import Process, process_from_spec
from pipeline.train import ema_multi_avg_fn

SOLVERS = ("ipf", "dsbm")
MODEL_KIND = "schrodinger_bridge"


@dataclass(frozen=True)
class BridgeSettings:
    """solver (ipf | dsbm); iterations of the two half-steps; updates of each network per half-step; the grid's
    num_steps N; `paths` walks redrawn every `refresh` updates; Adam's lr, gradient clipping and the EMA decay."""

    solver: str
    iterations: int
    steps: int
    batch_size: int
    lr: float
    num_steps: int
    seed: int
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    paths: int = 2048
    refresh: int = 50
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown bridge solver {self.solver!r}; allowed: {', '.join(SOLVERS)}")
        for key in ("iterations", "steps", "batch_size", "num_steps", "paths", "refresh", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"bridge training needs {key} >= 1, got {getattr(self, key)}")


@dataclass
class BridgeResult:
    """The raw and EMA networks of each direction, the loss rows (step, loss, direction, iteration) and the rows
    `evaluate` returned after each iteration."""

    nets: dict[str, nn.Module]
    ema: dict[str, nn.Module]
    loss_rows: list[tuple[int, float, str, int]] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)


def _draw(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n rows of x, without replacement while n <= len(x)."""
    idx = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(-(-n // len(x)))])[:n]
    return x[idx.to(x.device)]


def regression_rows(solver: str, process: Process, walk_drift: Optional[Callable], trained: str,
                    ends: Mapping[str, Tensor], num_steps: int, paths: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(x, t, target) rows for the `trained` direction's drift, each (paths N, ...).

    The other direction is walked with `walk_drift` from `paths` points of its start end (ends["forward"]: source
    points, ends["backward"]: target points). dsbm with walk_drift None pairs the two ends independently.
    """
    walked = opposite(trained)
    start = _draw(ends[walked], paths, generator)
    gamma = 1.0 / num_steps
    if solver == "ipf":
        out = transport(walk_drift, process, start, walked, num_steps, generator, record=num_steps + 1)
        return mean_matching_targets(walk_drift, out.trajectory, gamma)
    if walk_drift is None:
        other = _draw(ends[trained], paths, generator)
    else:
        other = transport(walk_drift, process, start, walked, num_steps, generator).x
    x0, x1 = (start, other) if walked == "forward" else (other, start)
    # The trained direction's drift is evaluated where its steps start: t_0 .. t_{N-1} forward, t_1 .. t_N backward.
    grid = time_grid(num_steps, "forward").to(x0.dtype)
    offset = 0 if trained == "forward" else 1
    xs, ts, targets = [], [], []
    for _ in range(num_steps):  # as many rows as IPF's paths give
        k = torch.randint(num_steps, (paths,), generator=generator) + offset
        t = grid[k].to(x0.device)
        xt = bridge_sample(process, x0, x1, t, torch.randn(x0.shape, generator=generator).to(x0))
        xs.append(xt)
        ts.append(t)
        targets.append(bridge_targets(process, x0, x1, xt, t, trained))
    return torch.cat(xs), torch.cat(ts), torch.cat(targets)


def train_bridge(networks: Mapping[str, nn.Module], process: Process, source: Tensor, target: Tensor,
                 settings: BridgeSettings, *, evaluate: Optional[Callable[[int, int, dict], dict]] = None,
                 on_log: Optional[Callable[[int, float, str], None]] = None, progress: bool = False) -> BridgeResult:
    """Fit the forward and backward drift networks (on source's device) between source (N0, *D) and target (N1, *D).

    evaluate(iteration, step, {direction: Drift of its EMA network}) after each iteration returns a row of metrics,
    kept in the result; on_log(step, loss, direction) every settings.log_every updates. All randomness comes from
    settings.seed (one torch.Generator on the CPU; the walks draw there and move the noise to the data's device)."""
    s = settings
    generator = torch.Generator().manual_seed(s.seed)
    optimizers = {d: torch.optim.Adam(networks[d].parameters(), lr=s.lr) for d in DIRECTIONS}
    ends = {"forward": source, "backward": target}
    # Until a network is trained, its "EMA" is the reference (forward) or never walked (backward, trained first).
    result = BridgeResult(dict(networks), {})
    bar = tqdm(total=2 * s.iterations * s.steps, desc=f"bridge ({s.solver})", disable=not progress, mininterval=1.0)
    step = 0
    for iteration in range(1, s.iterations + 1):
        for trained in ("backward", "forward"):
            walked = opposite(trained)
            first = iteration == 1 and trained == "backward"
            walk_drift = None if first and s.solver == "dsbm" else Drift(result.ema.get(walked), process, walked)
            model, net, optimizer = Drift(networks[trained], process, trained), networks[trained], optimizers[trained]
            # Each half-step fits a new target: its EMA starts from the warm-started weights, with score_sde's
            # warm-up, so that no share of the previous target's weights lingers (pipeline.train.ema_multi_avg_fn).
            ema = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(s.ema_decay, warmup=True))
            net.train()
            for k in range(s.steps):
                if k % s.refresh == 0:
                    with torch.no_grad():
                        rows = regression_rows(s.solver, process, walk_drift, trained, ends, s.num_steps, s.paths,
                                               generator)
                idx = torch.randint(len(rows[0]), (s.batch_size,), generator=generator).to(source.device)
                loss = ((model(rows[0][idx], rows[1][idx]) - rows[2][idx]) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
                optimizer.step()
                ema.update_parameters(net)
                step += 1
                bar.update()
                if step % s.log_every == 0:
                    value = loss.item()
                    result.loss_rows.append((step, value, trained, iteration))
                    if on_log is not None:
                        on_log(step, value, trained)
            result.ema[trained] = ema.module.eval()
        if evaluate is not None:
            with torch.no_grad():
                result.eval_rows.append({"iteration": iteration, "step": step,
                                         **evaluate(iteration, step, {d: Drift(m, process, d)
                                                                      for d, m in result.ema.items()})})
    bar.close()
    return result


def model_file(specs: Mapping[str, Mapping[str, Any]], networks: Mapping[str, nn.Module], process: Process,
               num_steps: int) -> dict:
    """The bridge's model file: {"config": the two network specs, the reference and the grid, "state_dict": the two
    networks' tensors under "forward." and "backward."}."""
    state = {f"{d}.{k}": v.detach().cpu().clone() for d in DIRECTIONS for k, v in networks[d].state_dict().items()
             if k != "n_averaged"}
    config = {"kind": MODEL_KIND, "parameterization": "drift", "process": process.spec(), "num_steps": int(num_steps),
              **{d: dict(specs[d]) for d in DIRECTIONS}}
    return {"config": config, "state_dict": state}


def load_bridge(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[Process, int, dict[str, Drift]]:
    """(reference process, num_steps, {direction: Drift}) of a bridge model file, the networks frozen on `device`."""
    obj = io.load_torch(path)
    config = obj.get("config") if isinstance(obj, dict) else None
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind != MODEL_KIND or "state_dict" not in obj:
        raise ValueError(f"{path} is not a Schrödinger bridge's model file (its kind: {kind!r}); re-run train")
    state = obj["state_dict"]
    process = process_from_spec(config["process"])
    drifts = {}
    for d in DIRECTIONS:
        net = nets.build_network(config[d], seed=0)
        net.load_state_dict({k[len(d) + 1:]: v for k, v in state.items() if k.startswith(f"{d}.")})
        net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        drifts[d] = Drift(net, process, d)
    return process, int(config["num_steps"]), drifts
