"""The sample stage's tasks other than generate (sample.task): inverse (inpaint its mask case), interpolate and edit
(SDEdit), each on the model and sampler the stage loaded, one process."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch

from pipeline import defaults, io
from pipeline.config import Config
from pipeline.edit import sdedit
from pipeline.inpaint import task_operator
from pipeline.inverse import measure, solve
from pipeline.interpolate import auto_scheme, interpolate
from pipeline.rng import SampleGenerators
from pipeline.tracking import StageRun
from stages.common import SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT
from stages.sampling import TRAJECTORY_FRAMES, Loaded, batched, check_finite, held_out, log_sample

def inverse_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: inverse or inpaint: the first sample.n test items measured, y = A x + noise n (sample.inverse;
    inpaint: the mask of sample.inpaint, noiseless), and x drawn given y by every method of sample.<task>.method on
    the same items and noise seeds. samples.npz: x (M, n, *D), methods (M,), x_known (n, *D) the originals, y
    (n, *K) the measurements in model space, operator (its description, JSON), mask (n, *D) for the mask operator."""
    s = cfg.sample
    p, key = getattr(s, s.task), f"sample.{s.task}"
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info)
    known = held_out(n)
    x_known = m.to_model(known)
    # sample.inpaint is the mask operator without noise; sample.inverse names its operator and noise
    spec = {"operator": "mask", "noise": 0.0, "seed": 0} | p.model_dump() | {
        "mask": defaults.inpaint_mask(p.mask, m.info)}
    operator = task_operator(spec, m.shape, n, torch.Generator().manual_seed(s.seed), device=m.device,
                             dtype=x_known.dtype, key=key)
    # the measurement noise of item i from its own generator: y does not depend on n or the batching
    y = measure(operator, x_known, spec["noise"], SampleGenerators(spec["seed"], range(n)))
    results, nfes, trajectory = [], {}, []
    for method in p.methods:
        options = defaults.method_options(method, p, m.info)

        def body(rows, gens, record, method=method, options=options):
            return solve(m.sampler, m.model_kind, m.score(m.fn), m.process, operator.rows(rows), y[rows],
                         (rows.stop - rows.start, *m.shape), gens, m.steps, m.options, method, noise=spec["noise"],
                         box=m.data.output_range(), progress=True, record=record, device=m.device,
                         dtype=x_known.dtype, **options)

        chunks, nfes[method], traj = batched(m, n, batch_size, s.seed, body)
        results.append(np.concatenate(chunks))
        trajectory = trajectory or traj
    x = np.stack(results)
    described = operator.describe() | {"noise": spec["noise"]}
    io.save_npz(SAMPLES, x=x, methods=np.array(p.methods), x_known=known, y=y.cpu().numpy().astype(np.float32),
                operator=np.array(json.dumps(described)), **operator.arrays())
    nfe = max(nfes.values())
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": n, "task": s.task, **described,
                                   **{f"nfe_{k}": v for k, v in nfes.items()}})
    what = f"{described['mask']} mask" if "mask" in described else spec["operator"]
    title = f"{cfg.method.name}: {m.sampler}, {what}" + (f", noise {spec['noise']:g}" if spec["noise"] else "")
    m.data.inverse_figure(SAMPLES_PLOT, known, m.data.measurement_view(operator, y), p.methods, x, nfes, title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, trajectory, f"{title} ({p.methods[0]})")
    log_sample(cfg, run, m, {"n": n, "batch_size": batch_size, "operator": what}, nfe)


def interpolate_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: interpolate: sample.interpolate.pairs rows of `frames` samples, row j running from sample 2j to
    sample 2j + 1 of the plain run (same sample.seed). samples.npz: x (P, K, *D), alpha (K,), scheme."""
    s, p = cfg.sample, cfg.sample.interpolate
    scheme = auto_scheme(m.sampler, m.options) if p.scheme == "auto" else p.scheme
    with torch.no_grad():
        out = interpolate(m.sampler, m.model_kind, m.score(m.fn), m.process, m.shape, s.seed, range(p.pairs),
                          p.frames, scheme, m.steps, m.options, progress=True, record=TRAJECTORY_FRAMES,
                          device=m.device)
    check_finite(out.x)
    x = m.data.to_output(out.x).reshape(p.pairs, p.frames, *m.shape)
    alpha = np.linspace(0.0, 1.0, p.frames)
    io.save_npz(SAMPLES, x=x, alpha=alpha, scheme=np.array(scheme))
    io.write_json(SAMPLE_METRICS, {"nfe": out.nfe, "n": int(p.pairs * p.frames), "task": "interpolate",
                                   "scheme": scheme})
    title = f"{cfg.method.name}: {m.sampler}, {scheme} interpolation"
    m.data.interpolation_figure(SAMPLES_PLOT, x, alpha, np.load(TEST), title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, out.trajectory, title)
    log_sample(cfg, run, m, {"n": p.pairs * p.frames, "scheme": scheme}, out.nfe)


def edit_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: edit (SDEdit): the first sample.n test items noised to each t0 of sample.edit.t0 and denoised.
    samples.npz: x (T, n, *D), t0 (T,), x_known (n, *D) the inputs."""
    s = cfg.sample
    times = s.edit.times
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info)
    inputs = held_out(n)
    x_in = m.to_model(inputs)
    results, nfes, trajectory = [], {}, []
    for t0 in times:
        chunks, nfes[t0], traj = batched(m, n, batch_size, s.seed, lambda rows, gens, record: sdedit(
            m.sampler, m.model_kind, m.score(m.fn), m.process, x_in[rows], t0, gens, m.steps, m.options,
            progress=True, record=record))
        results.append(np.concatenate(chunks))
        trajectory = traj if t0 == max(times) else trajectory
    x = np.stack(results)
    io.save_npz(SAMPLES, x=x, t0=np.array(times, dtype=np.float64), x_known=inputs)
    nfe = max(nfes.values())
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": n, "task": "edit",
                                   **{f"nfe_t0_{t0:g}": v for t0, v in nfes.items()}})
    title = f"{cfg.method.name}: {m.sampler}, SDEdit"
    m.data.edit_figure(SAMPLES_PLOT, inputs, times, x, title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, trajectory, f"{title} from t0 = {max(times):g}")
    log_sample(cfg, run, m, {"n": n, "batch_size": batch_size}, nfe)


TASKS: dict[str, Callable[[Config, StageRun, Loaded], None]] = {
    "inpaint": inverse_stage, "inverse": inverse_stage, "interpolate": interpolate_stage, "edit": edit_stage}
