"""ema: write the final model: the EMA weights (train.ema: true, NCSNv2 technique 5) or the raw weights."""

from __future__ import annotations

import shutil

from pipeline import io
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.tracking import StageRun
from stages.common import EMA_MODEL, MODEL, RAW_MODEL, main


def ema_stage(cfg: Config, run: StageRun) -> None:
    source = EMA_MODEL if cfg.train.ema else RAW_MODEL
    try:  # refuse what is not a model file; the structure only, so that this stage never imports torch
        io.check_torch_archive(source)
    except ValueError as err:
        raise DataError(f"train.ema: {'EMA' if cfg.train.ema else 'raw'} weights: {err}") from None
    with io.atomic_path(MODEL) as tmp:
        shutil.copyfile(source, tmp)
    run.log_params({"train.ema": cfg.train.ema, "source": str(source)})


if __name__ == "__main__":
    main("ema", ema_stage)
