"""ema: write the final model: the EMA weights (train.ema: true, NCSNv2 technique 5) or the raw weights."""

from __future__ import annotations

import shutil

from pipeline import io
from pipeline.config import Config
from pipeline.tracking import StageRun
from stages.common import EMA_MODEL, MODEL, RAW_MODEL, main


def ema_stage(cfg: Config, run: StageRun) -> None:
    source = EMA_MODEL if cfg.train.ema else RAW_MODEL
    io.load_torch(source)  # refuse a file that is not a weights-only model file
    with io.atomic_path(MODEL) as tmp:
        shutil.copyfile(source, tmp)
    run.log_params({"train.ema": cfg.train.ema, "source": str(source)})


if __name__ == "__main__":
    main("ema", ema_stage)
