"""sample: draw samples from the final model with the method's sampler; writes samples.npz and the figures.

Sample i draws all its noise from its own generator seeded from (sample.seed, i) (pipeline.rng), so
the samples do not depend on sample.batch_size. Images are stored as the uint8 pixels a PNG holds.

sample.devices N > 1 shards the sampling over N processes under torchrun (stages.common.relaunch). The n samples are
cut into the batches one process would draw, samples [k b, (k + 1) b) for b = sample.batch_size, and rank r draws
the contiguous run of batches [r K / N, (r + 1) K / N) of the K batches; rank 0 gathers them in order and writes.
Every batch is then computed exactly as in one process, so the samples are byte-identical whatever N, for every
sampler (set sample.batch_size <= n / N to give every process work).

Across sample.batch_size the noise is the same (per-sample seeds), but two samplers couple the samples of a batch
and change with the batching: the PC sampler's Langevin corrector (its step size uses norms averaged over the batch,
as score_sde) and the ODE sampler's RK45 (one adaptive step size for the batch). The others change only by the
float rounding of the network on another number of rows (CPU GEMM kernels are chosen by the row count: float32
coordinates may differ in their last bits; uint8 pixels almost never do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pipeline import defaults, io, models
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.errors import DataError
from pipeline.edit import sdedit
from pipeline.guidance import guided_score
from pipeline.inpaint import inpaint, make_mask
from pipeline.interpolate import auto_scheme, interpolate
from pipeline.kinds import DataKind, kind_of
from pipeline.parameterization import clip_denoised
from pipeline.processes import Process
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw
from pipeline.tracking import StageRun
from stages.common import (MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT,
                           choose_device, data_record, main, process_of, resolve, sampler_options)

# Grid times of the first batch kept for the trajectory figure ("x at 8 times").
TRAJECTORY_FRAMES = 8


@dataclass
class Loaded:
    """What every task of the stage starts from: the data record and kind, the process, the model and the sampler's
    options."""

    info: dict
    data: DataKind
    process: Process
    sampler: str
    device: torch.device
    model_kind: str
    fn: Callable
    clip: bool
    steps: Optional[int]
    options: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def score(self, fn: Callable) -> Callable:
        """fn, its x0_hat clipped to the data's range where sample.clip_denoised says so (outside any guidance: the
        guided x0_hat is the one clipped)."""
        return clip_denoised(fn, self.process, *self.data.value_range()) if self.clip else fn

    def to_model(self, data: np.ndarray) -> torch.Tensor:
        """Held-out items as stored in model space on the device."""
        return self.data.to_model(data, self.device)


def load(cfg: Config) -> Loaded:
    info, record, r = data_record(), io.read_json(NOISE_SCALES), resolve(cfg)
    process, sampler, device = process_of(record), r.plan.sampler, choose_device(cfg.train.device)
    model_kind, fn = models.load_model(MODEL, process, device=device)
    clip = defaults.clip_denoised(cfg.sample.clip_denoised, sampler, model_kind, info)
    steps, options = sampler_options(r, process, record)
    return Loaded(info, kind_of(info, record.get("scaling")), process, sampler, device, model_kind, fn, clip, steps,
                  options)


def sample_stage(cfg: Config, run: StageRun, group: Optional[Group] = None) -> None:
    """The sample stage's body; with a `group` (torchrun, N > 1) one rank's shard of it, rank 0 gathering and
    writing. sample.task other than generate: inpaint, interpolate or edit (one process)."""
    m = load(cfg)
    if cfg.sample.task != "generate":
        try:
            TASKS[cfg.sample.task](cfg, run, m)
        except ValueError as err:  # the library's refusal of a combination, before any work
            raise DataError(str(err)) from None
        return
    s = cfg.sample
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info)
    classes = _classes(cfg, n, m.info)

    def batch(rows: slice, gens: SampleGenerators, record: Optional[int]):
        fn = m.fn if classes is None else guided_score(m.fn, classes[rows].to(m.device), s.guidance)
        return draw(m.sampler, m.model_kind, m.score(fn), m.process, (rows.stop - rows.start, *m.shape), gens,
                    m.steps, m.options, progress=group is None or group.is_main, record=record, device=m.device)

    chunks, nfe, trajectory = _batched(m, n, batch_size, s.seed, batch, group)
    if group is not None:
        x, nfe, trajectory = _gather(group, chunks, nfe, trajectory)
        if not group.is_main:
            return
    else:
        x = np.concatenate(chunks)
    io.save_npz(SAMPLES, x=x, **({} if classes is None else {"y": classes.numpy()}))
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": int(len(x))})
    title = f"{cfg.method.name}: {m.sampler}, nfe={nfe}"
    m.data.samples_figure(SAMPLES_PLOT, x, np.load(TEST), title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, trajectory, title)
    _log(cfg, run, m, {"n": n, "batch_size": batch_size}, nfe)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size or "
                                 "more sample.steps)")


def _log(cfg: Config, run: StageRun, m: Loaded, resolved: dict, nfe: int) -> None:
    run.log_params({"sample": cfg.sample.model_dump(mode="json"), "sampler": m.sampler, "clip_denoised": m.clip,
                    **resolved})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)
    run.log_artifact(TRAJECTORY_PLOT)


def _held_out(n: int) -> np.ndarray:
    """The first n held-out test items, the known values of inpainting and the inputs of editing."""
    test = np.load(TEST)
    if len(test) < n:
        raise DataError(f"sample.n ({n}) is more than the {len(test)} held-out test items; lower sample.n")
    return test[:n]


def _batched(m: Loaded, n: int, batch_size: int, seed: int, body: Callable,
             group: Optional[Group] = None) -> tuple[list[np.ndarray], int, list]:
    """body(rows, generators, record) over the batches of n items (per-sample generators; with a group, this rank's
    run of the batches): the outputs as stored, batch by batch, the largest nfe and the recorded trajectory of the
    batch that starts at item 0."""
    chunks, nfe, trajectory = [], 0, []
    starts = range(0, n, batch_size)
    if group is not None:
        starts = starts[group.rows(len(starts))]
    with torch.no_grad():
        for start in starts:
            rows = slice(start, min(start + batch_size, n))
            out = body(rows, SampleGenerators(seed, range(rows.start, rows.stop)),
                       TRAJECTORY_FRAMES if start == 0 else None)
            _check_finite(out.x)
            chunks.append(m.data.to_output(out.x))
            trajectory = trajectory or [(t, x[:TRAJECTORY_FRAMES].cpu()) for t, x in out.trajectory]
            nfe = max(nfe, out.nfe)
    return chunks, nfe, trajectory


def inpaint_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: inpaint: the first sample.n test items with the mask's hidden part generated, by every method of
    sample.inpaint.method on the same items and noise seeds. samples.npz: x (M, n, *D), methods (M,), x_known and
    mask (n, *D), 1 where known."""
    s, p = cfg.sample, cfg.sample.inpaint
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info)
    known = _held_out(n)
    x_known = m.to_model(known)
    kind = defaults.inpaint_mask(p.mask, m.info)
    # one draw for all n items (a random mask's row i does not depend on the batching)
    mask = make_mask(kind, (n, *m.shape), torch.Generator().manual_seed(s.seed), p.keep, device=m.device,
                     dtype=x_known.dtype)
    results, nfes, trajectory = [], {}, []
    for method in p.methods:
        options = {"repaint": {"jump": p.jump, "resamples": p.resamples},
                   "mcg": {"alpha": defaults.mcg_alpha(p.alpha, m.info)}}.get(method, {})
        chunks, nfes[method], traj = _batched(m, n, batch_size, s.seed, lambda rows, gens, record: inpaint(
            m.sampler, m.model_kind, m.score(m.fn), m.process, x_known[rows], mask[rows], gens, m.steps, m.options,
            method, progress=True, record=record, **options))
        results.append(np.concatenate(chunks))
        trajectory = trajectory or traj
    x = np.stack(results)
    mask_out = mask.to(torch.uint8).cpu().numpy()
    io.save_npz(SAMPLES, x=x, methods=np.array(p.methods), x_known=known, mask=mask_out)
    nfe = max(nfes.values())
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": n, "task": "inpaint", "mask": kind,
                                   **{f"nfe_{k}": v for k, v in nfes.items()}})
    title = f"{cfg.method.name}: {m.sampler}, {kind} mask, inpainting"
    m.data.inpaint_figure(SAMPLES_PLOT, known, mask_out, p.methods, x, nfes, title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, trajectory, f"{title} ({p.methods[0]})")
    _log(cfg, run, m, {"n": n, "batch_size": batch_size, "mask": kind}, nfe)


def interpolate_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: interpolate: sample.interpolate.pairs rows of `frames` samples, row j running from sample 2j to
    sample 2j + 1 of the plain run (same sample.seed). samples.npz: x (P, K, *D), alpha (K,), scheme."""
    s, p = cfg.sample, cfg.sample.interpolate
    scheme = auto_scheme(m.sampler, m.options) if p.scheme == "auto" else p.scheme
    with torch.no_grad():
        out = interpolate(m.sampler, m.model_kind, m.score(m.fn), m.process, m.shape, s.seed, range(p.pairs),
                          p.frames, scheme, m.steps, m.options, progress=True, record=TRAJECTORY_FRAMES,
                          device=m.device)
    _check_finite(out.x)
    x = m.data.to_output(out.x).reshape(p.pairs, p.frames, *m.shape)
    alpha = np.linspace(0.0, 1.0, p.frames)
    io.save_npz(SAMPLES, x=x, alpha=alpha, scheme=np.array(scheme))
    io.write_json(SAMPLE_METRICS, {"nfe": out.nfe, "n": int(p.pairs * p.frames), "task": "interpolate",
                                   "scheme": scheme})
    title = f"{cfg.method.name}: {m.sampler}, {scheme} interpolation"
    m.data.interpolation_figure(SAMPLES_PLOT, x, alpha, np.load(TEST), title)
    m.data.trajectory_figure(TRAJECTORY_PLOT, out.trajectory, title)
    _log(cfg, run, m, {"n": p.pairs * p.frames, "scheme": scheme}, out.nfe)


def edit_stage(cfg: Config, run: StageRun, m: Loaded) -> None:
    """sample.task: edit (SDEdit): the first sample.n test items noised to each t0 of sample.edit.t0 and denoised.
    samples.npz: x (T, n, *D), t0 (T,), x_known (n, *D) the inputs."""
    s = cfg.sample
    times = s.edit.times
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info)
    inputs = _held_out(n)
    x_in = m.to_model(inputs)
    results, nfes, trajectory = [], {}, []
    for t0 in times:
        chunks, nfes[t0], traj = _batched(m, n, batch_size, s.seed, lambda rows, gens, record: sdedit(
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
    _log(cfg, run, m, {"n": n, "batch_size": batch_size}, nfe)


TASKS: dict[str, Callable[[Config, StageRun, Loaded], None]] = {
    "inpaint": inpaint_stage, "interpolate": interpolate_stage, "edit": edit_stage}


def _classes(cfg: Config, n: int, info: dict) -> Optional[torch.Tensor]:
    """Each sample's 0-based class (n,) for a class-conditional model (sample.classes), else None."""
    if not cfg.method.conditional:
        return None
    try:
        return defaults.sample_classes(cfg.sample.classes, n, info["num_classes"])
    except ValueError as err:
        raise DataError(str(err)) from None


def _gather(group: Group, chunks: list[np.ndarray], nfe: int, trajectory: list) -> tuple[Optional[np.ndarray], int, list]:
    """Every rank's samples in rank order (the order of one process), the largest nfe and the trajectory of the
    batch that starts at sample 0, on rank 0; (None, nfe, trajectory) elsewhere."""
    parts = group.gather((chunks, nfe, trajectory))
    if parts is None:
        return None, nfe, trajectory
    x = np.concatenate([c for rank_chunks, _, _ in parts for c in rank_chunks])
    trajectory = next((tr for _, _, tr in parts if tr), [])
    return x, max(f for _, f, _ in parts), trajectory


if __name__ == "__main__":
    main("sample", sample_stage)
