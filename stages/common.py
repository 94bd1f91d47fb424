"""What every stage shares: the declared paths, parsing --params, the MLflow stage run, and the dispatch of a stage
to one process, to its torchrun re-launch or to one rank of it (stages.launch; the device: pipeline.devices)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from pipeline import config, io
from pipeline.devices import check_gpus
from pipeline.errors import DataError
from pipeline.tracking import (NullRun, StageRun, open_tracker, pipeline_key, resolve_root, run_tags, spool_dir,
                               store_of)
from stages.launch import relaunch, run_rank, torchrun_world

if TYPE_CHECKING:  # torch and what imports it load only in the stages that use them: report and ema start in < 2 s
    from families.base import Family, Plan
    from pipeline.processes import Process

# The files dvc.yaml declares, relative to the repository root.
TRAIN, TEST, REFERENCE = Path("data/train.npy"), Path("data/test.npy"), Path("data/reference.npy")
LABELS = {"train": Path("data/train_labels.npy"), "test": Path("data/test_labels.npy"),
          "reference": Path("data/reference_labels.npy")}
DATA_RECORD = Path("data/record.json")
TARGET = Path("data/target.npz")  # a Schrödinger bridge's target: arrays train, test, reference (none without one)
FID_REFERENCE, FID_METRICS = Path("outputs/fid_reference.npz"), Path("metrics/fid_reference.json")
CLASSIFIER, CLASSIFIER_METRICS = Path("models/classifier.pt"), Path("metrics/classifier.json")
DOMAIN_REFERENCE = Path("outputs/domain_reference.npz")
NOISE_SCALES, NOISE_PLOT = Path("outputs/noise_scales.json"), Path("outputs/noise_scales.png")
CHECKPOINTS = Path("checkpoints")
RAW_MODEL, EMA_MODEL, MODEL = Path("models/raw.pt"), Path("models/ema.pt"), Path("models/model.pt")
# What sample and evaluate load: the ema stage's model, or what the distill stage trained from it (reflow)
FINAL_MODEL, REFLOW = Path("models/final.pt"), Path("outputs/reflow")
POSTHOC = Path("models/posthoc")  # the post-hoc EMA's snapshots (pipeline.posthoc), one file per step
LOSS_CSV, TRAIN_METRICS = Path("plots/train_loss.csv"), Path("metrics/train.json")
EVAL_CSV, TRAIN_SAMPLES = Path("plots/train_eval.csv"), Path("outputs/train_samples")
SAMPLES, SAMPLES_PLOT, SAMPLE_METRICS = Path("outputs/samples.npz"), Path("outputs/samples.png"), Path("metrics/sample.json")
TRAJECTORY_PLOT = Path("outputs/trajectory.png")
EVAL_METRICS, EVAL_PLOT = Path("metrics/evaluate.json"), Path("outputs/density.png")
NEIGHBOURS_PLOT = Path("outputs/neighbours.png")
REPORT, REPORT_FIGURES = Path("reports/report.md"), Path("reports/figures")

StageBody = Callable[[config.Config, StageRun], None]


@dataclass(frozen=True)
class Resolved:
    """A run resolved once per stage and passed on: the config, its method family and the family's plan (process
    kind, loss, parameterization, sampler)."""

    cfg: config.Config
    family: Family
    plan: Plan


def resolve(cfg: config.Config) -> Resolved:
    """The run's family and plan (validated when params loaded, so this never refuses)."""
    import families

    return Resolved(cfg, families.get(cfg.method.name), families.plan(cfg))


def publish_snapshots(source: Optional[Path]) -> None:
    """Make POSTHOC hold copies of the snapshot files in `source` (None, or a family that keeps none: empty), the
    train stage's declared output; the checkpoint folder keeps its own for a resume."""
    import shutil

    tmp = POSTHOC.with_name(f".{POSTHOC.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(Path(source).glob("*.pt")) if source is not None and Path(source).is_dir() else []:
        shutil.copyfile(path, tmp / path.name)
    shutil.rmtree(POSTHOC, ignore_errors=True)
    tmp.rename(POSTHOC)


def data_record() -> dict:
    """What prepare recorded about the data: kind ('points' or 'images'), shape, split sizes, classes."""
    return io.read_json(DATA_RECORD)


def process_of(record: dict) -> Process:
    """The forward process the noise_scales stage chose, rebuilt from outputs/noise_scales.json."""
    from pipeline.processes import process_from_spec

    return process_from_spec(record["process"])


def sampler_options(r: Resolved, process: Process, record: dict) -> tuple[Optional[int], dict]:
    """(grid steps, options) of the run's sampler from sample.* and the noise_scales record."""
    s, sampler = r.cfg.sample, r.plan.sampler
    options = s.model_dump(include={"denoise", "variance", "eta", "predictor", "corrector", "snr", "corrector_steps",
                                    "lam", "ode_method", "rtol", "atol", "spacing", "rho", "churn", "s_tmin",
                                    "s_tmax", "s_noise"})
    if sampler == "annealed_langevin":
        options.update(step_size=record["step_size"], steps_per_scale=record["steps_per_scale"])
    return r.family.sampling_steps(process, s.steps, sampler), options


# The stages that run on several processes, with the key saying how many; their bodies take a `group` keyword
# (a pipeline.distributed.Group, or None for one process).
DEVICES_KEYS: dict[str, Callable[[config.Config], int]] = {"train": lambda cfg: cfg.train.devices,
                                                           "sample": lambda cfg: cfg.sample.devices}


def run_stage(name: str, body: StageBody, argv: Optional[Sequence[str]] = None) -> int:
    """Validate params, open the stage's MLflow child run, run `body`; 2 on bad input, before any work.

    With train.devices / sample.devices N > 1 outside torchrun, the stage runs itself again under torchrun with N
    processes (relaunch) and returns their status; under torchrun with a world of several processes it joins
    the process group (run_rank)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
    except config.ConfigError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    body = _family_body(cfg, name) or body
    world = torchrun_world()
    if world is not None and world.size > 1:
        if name not in DEVICES_KEYS:
            print(f"{name}: runs in one process; only {' and '.join(DEVICES_KEYS)} run under torchrun "
                  f"(WORLD_SIZE={world.size} here)", file=sys.stderr)
            return 2
        return run_rank(name, body, cfg, world, lambda call: _tracked(name, cfg, call))
    n = DEVICES_KEYS[name](cfg) if name in DEVICES_KEYS and world is None else 1
    if n > 1:
        try:
            check_gpus(cfg.train.device, n, f"{name}.devices")
        except DataError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 2
        return relaunch(name, args.params, n, cfg.train.device)
    return _tracked(name, cfg, lambda run: body(cfg, run))


# The stages that ask the run's method family (its process, loss, sampler, or a body of its own); dvc.yaml lists
# families/${method.name} among their deps. The others use the family only to validate params, which can refuse a
# run but never change an output.
FAMILY_STAGES = ("noise_scales", "train", "distill", "sample", "evaluate")


def _family_body(cfg: config.Config, name: str) -> Optional[StageBody]:
    """The body of stage `name` that the run's method family brings (families/<method.name>/), if it has its own."""
    import families

    return families.get(cfg.method.name).stage(name) if name in FAMILY_STAGES else None


# The stages that log a live curve to MLflow while they work; the others record their calls and a detached
# process replays them after the stage ends (pipeline.spool), which keeps mlflow's import off their critical path.
LIVE_STAGES = ("train",)
# SCORE_PIPELINE_TRACKING=sync: every stage logs to MLflow itself, before it exits (tests, debugging); off: no stage
# logs to MLflow (nor imports it), the DVC files alone are the record.
TRACKING_ENV = "SCORE_PIPELINE_TRACKING"
# Records older than this that no replay took are reported by the next stage.
STALE_SECONDS = 120


def parent_run_name(cfg: config.Config, key: str, env: dict) -> str:
    """The MLflow name of the pipeline's parent run: method, data and the DVC experiment (else `workspace`)."""
    import families

    method = families.label(cfg.method.name, cfg.method.sde)
    sampler = "" if cfg.sample.sampler == "auto" else f" {cfg.sample.sampler}"
    return f"{method}{sampler} · {cfg.data.name} · {env.get('DVC_EXP_NAME') or 'workspace ' + key}"


def _tracked(name: str, cfg: config.Config, call: Callable[[Any], None]) -> int:
    """call(run) inside the stage's MLflow child run; 2 on DataError (bad input), printed."""
    root = resolve_root(os.environ, Path.cwd())
    key, tags = pipeline_key(root, os.environ), run_tags(root, os.environ)
    parent_name = parent_run_name(cfg, key, os.environ)
    if os.environ.get(TRACKING_ENV) == "off":
        run = NullRun()
    elif name in LIVE_STAGES or os.environ.get(TRACKING_ENV) == "sync":
        tracker = open_tracker(root, os.environ, experiment=cfg.tracking.experiment)
        run = tracker.stage(name, key, tags, parent_name)
    else:
        from pipeline.spool import Recorder, stale

        spool = spool_dir(root)
        waiting = stale(spool, STALE_SECONDS)
        if waiting:
            print(f"{name}: {waiting} MLflow record(s) of earlier stages wait in {spool} (see replay.log there); "
                  f"a replay after this stage tries again", file=sys.stderr)
        run = Recorder(spool, store_of(root, os.environ, cfg.tracking.experiment), name, key, tags, parent_name)
    try:
        with run:
            call(run)
    except DataError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    return 0


# Every stage in dvc.yaml's order, with the name of its body function in stages/<name>.py.
STAGE_BODIES = {"prepare": "prepare", "noise_scales": "noise_scales", "fid_reference": "fid_reference_stage",
                "classifier": "classifier_stage", "train": "train_stage", "ema": "ema_stage",
                "distill": "distill_stage", "sample": "sample_stage",
                "evaluate": "evaluate_stage", "report": "report_stage"}


def run_named(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run stage `name` in this process (tests, benchmarks): what `python -m stages.<name>` does."""
    import importlib

    return run_stage(name, getattr(importlib.import_module(f"stages.{name}"), STAGE_BODIES[name]), argv)


def main(name: str, body: StageBody) -> None:
    """Entry point for `python -m stages.<name>`."""
    sys.exit(run_stage(name, body))
