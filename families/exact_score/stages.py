"""The train stage of method.name: exact_score: the mixture's exact score written as the model (nothing trained)."""

from __future__ import annotations

from typing import Optional

from pipeline import io, models
from pipeline.config import Config
from pipeline.distributed import Group
from pipeline.gmm import GaussianMixture
from pipeline.tracking import StageRun
from stages.common import CHECKPOINTS, EMA_MODEL, EVAL_CSV, LOSS_CSV, RAW_MODEL, TRAIN_METRICS, publish_snapshots


def train_stage(cfg: Config, run: StageRun, group: Optional[Group] = None) -> None:
    """Both model files hold the exact model of data.gmm; the curves are empty and no step was taken."""
    run.log_params({"seed": cfg.seed, "method": cfg.method.model_dump(mode="json"),
                    "model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                    "loss": None, "parameterization": "score"})
    if group is not None and not group.is_main:
        return
    g = cfg.data.gmm
    exact = models.gmm_model_file(GaussianMixture.from_params(g.weights, g.means, g.covs))
    for path in (RAW_MODEL, EMA_MODEL):
        io.save_torch(path, exact)
    publish_snapshots(None)  # nothing trained: no post-hoc EMA
    io.write_text(LOSS_CSV, "step,loss\n")
    io.write_text(EVAL_CSV, "step,value,se,unit\n")
    io.write_json(TRAIN_METRICS, {"steps": 0, "num_params": 0, "final_loss": None})
    CHECKPOINTS.mkdir(exist_ok=True)
