"""ema: write the final model by ema.method: the decay EMA training kept (NCSNv2 technique 5), the post-hoc EMA of
width ema.sigma_rel reconstructed from train.posthoc's snapshots (Karras et al. 2024), or the raw weights.

Only this stage reads the ema section, so changing ema.* re-runs ema -> sample -> evaluate -> report, never train.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from pipeline import io
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.tracking import StageRun
from stages.common import EMA_MODEL, MODEL, POSTHOC, RAW_MODEL, main


def _copy(source: Path, what: str) -> dict:
    """The model file training wrote, copied as it is; refused when it is not a model file (the structure only, so
    that this path never imports torch)."""
    try:
        io.check_torch_archive(source)
    except ValueError as err:
        raise DataError(f"ema.method: {what} weights: {err}") from None
    with io.atomic_path(MODEL) as tmp:
        shutil.copyfile(source, tmp)
    return {"source": str(source)}


def _posthoc(cfg: Config) -> dict:
    """EDM2's reconstruction (pipeline.posthoc) at the last snapshot's step, in EMA_MODEL's network spec (the
    model file of pipeline.models.save_model: {"config": spec, "state_dict": weights})."""
    from pipeline.posthoc import reconstruct

    try:
        state, coef, step = reconstruct(POSTHOC, cfg.ema.sigma_rel)
    except FileNotFoundError:
        raise DataError(f"ema.method: posthoc needs the snapshots of train.posthoc in {POSTHOC}/, and training wrote "
                        f"none (method.name: {cfg.method.name} keeps no post-hoc EMA profiles)") from None
    io.save_torch(MODEL, {"config": io.load_torch(EMA_MODEL)["config"], "state_dict": state})
    print(f"ema: sigma_rel {cfg.ema.sigma_rel:g} at step {step} from {len(coef.x)} snapshot profiles (relative "
          f"L2 error of the profile {coef.relative:.2e})")
    return {"sigma_rel": cfg.ema.sigma_rel, "step": step, "profiles": len(coef.x), "profile_error": coef.relative}


# ema.method -> how the final model is made (pipeline.names.EMA_METHODS names the same methods)
FINAL_MODELS: dict[str, Callable[[Config], dict]] = {
    "decay": lambda cfg: _copy(EMA_MODEL, "decay EMA"),
    "posthoc": _posthoc,
    "none": lambda cfg: _copy(RAW_MODEL, "raw"),
}


def ema_stage(cfg: Config, run: StageRun) -> None:
    record = FINAL_MODELS[cfg.ema.method](cfg)
    run.log_params({"final_model": cfg.ema.method, **{f"final_{k}": v for k, v in record.items()}})


if __name__ == "__main__":
    main("ema", ema_stage)
