"""What every stage shares: the declared paths, parsing --params, and the MLflow stage run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pipeline import config, io
from pipeline.data import DataError
from pipeline.methods import Plan, plan, sampling_steps
from pipeline.processes import Process, process_from_spec
from pipeline.tracking import StageRun, open_tracker, pipeline_key, resolve_root, run_tags

# The files dvc.yaml declares, relative to the repository root.
TRAIN, TEST, REFERENCE = Path("data/train.npy"), Path("data/test.npy"), Path("data/reference.npy")
LABELS = {"train": Path("data/train_labels.npy"), "test": Path("data/test_labels.npy"),
          "reference": Path("data/reference_labels.npy")}
DATA_RECORD = Path("data/record.json")
FID_REFERENCE, FID_METRICS = Path("outputs/fid_reference.npz"), Path("metrics/fid_reference.json")
CLASSIFIER, CLASSIFIER_METRICS = Path("models/classifier.pt"), Path("metrics/classifier.json")
DOMAIN_REFERENCE = Path("outputs/domain_reference.npz")
NOISE_SCALES, NOISE_PLOT = Path("outputs/noise_scales.json"), Path("outputs/noise_scales.png")
CHECKPOINTS = Path("checkpoints")
RAW_MODEL, EMA_MODEL, MODEL = Path("models/raw.pt"), Path("models/ema.pt"), Path("models/model.pt")
LOSS_CSV, TRAIN_METRICS = Path("plots/train_loss.csv"), Path("metrics/train.json")
EVAL_CSV, TRAIN_SAMPLES = Path("plots/train_eval.csv"), Path("outputs/train_samples")
SAMPLES, SAMPLES_PLOT, SAMPLE_METRICS = Path("outputs/samples.npz"), Path("outputs/samples.png"), Path("metrics/sample.json")
TRAJECTORY_PLOT = Path("outputs/trajectory.png")
EVAL_METRICS, EVAL_PLOT = Path("metrics/evaluate.json"), Path("outputs/density.png")
NEIGHBOURS_PLOT = Path("outputs/neighbours.png")
REPORT, REPORT_FIGURES = Path("reports/report.md"), Path("reports/figures")

StageBody = Callable[[config.Config, StageRun], None]


def plan_of(cfg: config.Config) -> Plan:
    """The method's resolved process, loss, parameterization and sampler (validated when params loaded)."""
    m = cfg.method
    return plan(m.name, m.sde, m.loss, m.weighting, m.parameterization, m.t_sampling, cfg.model.scale_by_sigma,
                cfg.sample.sampler, cfg.eval.likelihood)


def data_record() -> dict:
    """What prepare recorded about the data: kind ('points' or 'images'), shape, split sizes, classes."""
    return io.read_json(DATA_RECORD)


def choose_device(setting: str) -> torch.device:
    """train.device resolved: 'auto' is CUDA when there is one, else the CPU; 'cuda' without CUDA is refused."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device: cuda, but torch sees no CUDA device here (use auto or cpu)")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def process_of(record: dict) -> Process:
    """The forward process the noise_scales stage chose, rebuilt from outputs/noise_scales.json."""
    return process_from_spec(record["process"])


def sampler_options(cfg: config.Config, process: Process, record: dict) -> tuple[Optional[int], dict]:
    """(grid steps, options) of the method's sampler from sample.* and the noise_scales record."""
    s = cfg.sample
    options = s.model_dump(include={"denoise", "variance", "eta", "predictor", "corrector", "snr", "corrector_steps",
                                    "lam", "ode_method", "rtol", "atol"})
    if plan_of(cfg).sampler == "annealed_langevin":
        options.update(step_size=record["step_size"], steps_per_scale=record["steps_per_scale"])
    return sampling_steps(process, s.steps), options


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


# Every stage in dvc.yaml's order, with the name of its body function in stages/<name>.py.
STAGE_BODIES = {"prepare": "prepare", "noise_scales": "noise_scales", "fid_reference": "fid_reference_stage",
                "classifier": "classifier_stage", "train": "train_stage", "ema": "ema_stage", "sample": "sample_stage",
                "evaluate": "evaluate_stage", "report": "report_stage"}


def run_named(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run stage `name` in this process (tests, benchmarks): what `python -m stages.<name>` does."""
    import importlib

    return run_stage(name, getattr(importlib.import_module(f"stages.{name}"), STAGE_BODIES[name]), argv)


def main(name: str, body: StageBody) -> None:
    """Entry point for `python -m stages.<name>`."""
    sys.exit(run_stage(name, body))
