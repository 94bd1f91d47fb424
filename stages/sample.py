"""sample: draw samples from the final model with the method's sampler; writes samples.npz and the figures.

Sample i draws all its noise from its own generator seeded from (sample.seed, i) (pipeline.rng), so
the samples do not depend on sample.batch_size. Images are stored as the uint8 pixels a PNG holds.

sample.devices N > 1 shards the sampling over N processes under torchrun (stages.launch.relaunch). The n samples are
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

from typing import Optional

import numpy as np
import torch

from pipeline import defaults, io
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.errors import DataError
from pipeline.guidance import guided_score
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw
from pipeline.tracking import StageRun
from stages.common import SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAJECTORY_PLOT, main
from stages.sampling import batched, load, log_sample
from stages.tasks import TASKS


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
    try:
        n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, m.info, cfg.eval.fid_seeds)
    except ValueError as err:  # sample.n short of eval.fid_seeds sets, before any work
        raise DataError(str(err)) from None
    classes = _classes(cfg, n, m.info)

    def batch(rows: slice, gens: SampleGenerators, record: Optional[int]):
        fn = m.fn if classes is None else guided_score(m.fn, classes[rows].to(m.device), s.guidance)
        return draw(m.sampler, m.model_kind, m.score(fn), m.process, (rows.stop - rows.start, *m.shape), gens,
                    m.steps, m.options, progress=group is None or group.is_main, record=record, device=m.device)

    chunks, nfe, trajectory = batched(m, n, batch_size, s.seed, batch, group)
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
    log_sample(cfg, run, m, {"n": n, "batch_size": batch_size}, nfe)


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
