"""What every stage shares: the declared paths, parsing --params, and the MLflow stage run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline import config
from pipeline.data import DataError
from pipeline.methods import Plan, plan
from pipeline.processes import Process, process_from_spec
from pipeline.tracking import StageRun, open_tracker, pipeline_key, resolve_root, run_tags

# The files dvc.yaml declares, relative to the repository root.
TRAIN, TEST, REFERENCE = Path("data/train.npy"), Path("data/test.npy"), Path("data/reference.npy")
NOISE_SCALES, NOISE_PLOT = Path("outputs/noise_scales.json"), Path("outputs/noise_scales.png")
CHECKPOINTS = Path("checkpoints")
RAW_MODEL, EMA_MODEL, MODEL = Path("models/raw.pt"), Path("models/ema.pt"), Path("models/model.pt")
LOSS_CSV, TRAIN_METRICS = Path("plots/train_loss.csv"), Path("metrics/train.json")
SAMPLES, SAMPLES_PLOT, SAMPLE_METRICS = Path("outputs/samples.npz"), Path("outputs/samples.png"), Path("metrics/sample.json")
EVAL_METRICS, EVAL_PLOT = Path("metrics/evaluate.json"), Path("outputs/density.png")
REPORT, REPORT_FIGURES = Path("reports/report.md"), Path("reports/figures")

StageBody = Callable[[config.Config, StageRun], None]


def plan_of(cfg: config.Config) -> Plan:
    """The method's resolved process, loss, parameterization and sampler (validated when params loaded)."""
    m = cfg.method
    return plan(m.name, m.sde, m.loss, m.weighting, m.parameterization, m.t_sampling, cfg.model.scale_by_sigma,
                cfg.sample.sampler, cfg.eval.likelihood)


def process_of(record: dict) -> Process:
    """The forward process the noise_scales stage chose, rebuilt from outputs/noise_scales.json."""
    return process_from_spec(record["process"])


def run_stage(name: str, body: StageBody, argv: Optional[Sequence[str]] = None) -> int:
    """Validate params, open the stage's MLflow child run, run `body`; 2 on bad input, before any work."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
    except config.ConfigError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    root = resolve_root(os.environ, Path.cwd())
    tracker = open_tracker(root, os.environ, experiment=cfg.tracking.experiment)
    try:
        with tracker.stage(name, pipeline_key(root, os.environ), run_tags(root, os.environ)) as run:
            body(cfg, run)
    except DataError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    return 0


def main(name: str, body: StageBody) -> None:
    """Entry point for `python -m stages.<name>`."""
    sys.exit(run_stage(name, body))
