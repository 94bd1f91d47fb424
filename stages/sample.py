"""sample: draw samples from the final model with the method's sampler; writes samples.npz and a scatter figure."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import io, models, plots
from pipeline.config import Config
from pipeline.methods import sampling_steps
from pipeline.samplers import draw
from pipeline.tracking import StageRun
from stages.common import MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, SAMPLES_PLOT, TEST, TRAIN, main, plan_of, process_of


def sample_stage(cfg: Config, run: StageRun) -> None:
    s = cfg.sample
    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    sampler = plan_of(cfg).sampler
    model_kind, fn = models.load_model(MODEL, process)
    steps = sampling_steps(process, s.steps)
    options = s.model_dump(include={"denoise", "variance", "eta", "predictor", "corrector", "snr", "corrector_steps",
                                    "lam", "ode_method", "rtol", "atol"})
    if sampler == "annealed_langevin":
        options.update(step_size=record["step_size"], steps_per_scale=record["steps_per_scale"])
    shape = np.load(TRAIN, mmap_mode="r").shape[1:]
    gen = torch.Generator().manual_seed(s.seed)
    chunks, nfe = [], 0
    with torch.no_grad():
        for start in range(0, s.n, s.batch_size):
            b = min(s.batch_size, s.n - start)
            out = draw(sampler, model_kind, fn, process, (b, *shape), gen, steps, options, progress=True)
            chunks.append(out.x.numpy())
            nfe = max(nfe, out.nfe)
    x = np.concatenate(chunks).astype(np.float32)
    if not np.isfinite(x).all():
        raise FloatingPointError("sampling diverged: non-finite samples (try a smaller noise.step_size or more sample.steps)")
    io.save_npz(SAMPLES, x=x)
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": int(len(x))})
    plots.scatter_samples(SAMPLES_PLOT, x, np.load(TEST)[: len(x)], f"{cfg.method.name}: {sampler}, nfe={nfe}")
    run.log_params({"sample": s.model_dump(mode="json"), "sampler": sampler})
    run.log_metrics({"nfe": nfe})
    run.log_artifact(SAMPLES_PLOT)


if __name__ == "__main__":
    main("sample", sample_stage)
