"""What every stage shares: the declared paths, parsing --params, the MLflow stage run, the device, and running a
stage on several processes (train.devices, sample.devices: the stage re-launches itself under torchrun).

Devices. train.device picks the kind (auto: CUDA when there is one); the GPU is picked here:
- under torchrun (LOCAL_RANK set) the process takes GPU LOCAL_RANK;
- alone on a node with several GPUs (e.g. `dvc queue start -j N`, where DVC sets no CUDA_VISIBLE_DEVICES per
  worker) it takes the first GPU nobody holds, holding an exclusive lock file (fcntl.flock on
  score-pipeline-gpu-<i>.lock in $SCORE_PIPELINE_LOCK_DIR, default the temp dir) until the process ends, when the
  OS releases it; with every GPU taken it shares one (chosen by its process id) and says so on stderr, rather than
  wait: sharing is what every worker did before these locks, never blocks, and small runs fit side by side;
- with one GPU it takes it, no lock.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Sequence

from pipeline import config, io
from pipeline.errors import DataError
from pipeline.tracking import StageRun, open_tracker, pipeline_key, resolve_root, run_tags, spool_dir, store_of

if TYPE_CHECKING:  # torch and what imports it load only in the stages that use them: report and ema start in < 2 s
    import torch

    from families.base import Family, Plan
    from pipeline import distributed
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


def data_record() -> dict:
    """What prepare recorded about the data: kind ('points' or 'images'), shape, split sizes, classes."""
    return io.read_json(DATA_RECORD)


LOCK_DIR_ENV = "SCORE_PIPELINE_LOCK_DIR"


class GpuLocks:
    """Exclusive per-GPU lock files that spread the stages of one node over its GPUs (see the module docstring).

    One instance per holder (the stage process has one, GPU_LOCKS); it keeps the files it locked open, and a
    lock lives as long as its open file: release() or the end of the process frees it. `count` GPUs are those
    torch sees; the lock files are named by CUDA_VISIBLE_DEVICES's entries when it is set, so workers restricted to
    different devices never collide on an index."""

    def __init__(self, env: Optional[dict] = None):
        self.env = os.environ if env is None else env
        self.held: list[tuple[int, Optional[IO[str]]]] = []  # (index, locked file or None when shared)

    def path(self, index: int) -> Path:
        visible = [v.strip() for v in self.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        name = visible[index] if index < len(visible) else str(index)
        return Path(self.env.get(LOCK_DIR_ENV) or tempfile.gettempdir()) / f"score-pipeline-gpu-{name}.lock"

    def _try(self, index: int) -> Optional[IO[str]]:
        """The open, exclusively locked lock file of GPU `index`, or None when another holder has it."""
        path = self.path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held elsewhere
            f.close()
            return None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")  # who holds it, for a person looking at the file
        f.flush()
        return f

    def acquire(self, count: int, n: int = 1) -> list[int]:
        """`n` GPU indices of `count` for this holder: the ones it holds already, else free ones (locked), topped up
        with shared ones (a message on stderr) when fewer than n are free."""
        if self.held:
            return [i for i, _ in self.held][:n]
        for i in range(count):
            if len(self.held) == n:
                break
            f = self._try(i)
            if f is not None:
                self.held.append((i, f))
        if len(self.held) < n:
            mine = {i for i, _ in self.held}
            others = [i for i in range(count) if i not in mine] or list(range(count))
            start = os.getpid() % len(others)
            shared = (others[start:] + others[:start])[:n - len(self.held)]
            self.held += [(i, None) for i in shared]
            print(f"device: every GPU of this node is held by another pipeline stage (lock files "
                  f"{self.path(0).parent}/score-pipeline-gpu-*.lock); sharing cuda:{', cuda:'.join(map(str, shared))}",
                  file=sys.stderr)
        locked = [str(self.path(i)) for i, f in self.held if f is not None]
        if locked:
            print(f"device: holding {', '.join(locked)} until this stage ends", file=sys.stderr)
        return sorted(i for i, _ in self.held)

    def release(self) -> None:
        """Give every held GPU back (closing a file releases its flock)."""
        for _, f in self.held:
            if f is not None:
                f.close()
        self.held = []


# The stage process's locks: held from its first choose_device until it exits.
GPU_LOCKS = GpuLocks()


def cuda_count() -> int:
    """How many CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_device(setting: str) -> torch.device:
    """train.device resolved: 'auto' is CUDA when there is one, else the CPU; 'cuda' without CUDA is refused.

    The GPU: LOCAL_RANK's under torchrun; a free one (locked) on a node with several; the only one otherwise."""
    import torch

    from pipeline import distributed

    if setting == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device: cuda, but torch sees no CUDA device here (use auto or cpu)")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    world, count = distributed.world_from_env(os.environ), torch.cuda.device_count()
    if world is not None:
        if world.local_rank >= count:
            raise DataError(f"torchrun started {world.local_rank + 1}+ processes on this node (LOCAL_RANK "
                            f"{world.local_rank}) but torch sees {count} CUDA device(s): one GPU per process")
        return torch.device("cuda", world.local_rank)
    if count > 1:
        return torch.device("cuda", GPU_LOCKS.acquire(count)[0])
    return torch.device("cuda")


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
# Where the processes torchrun starts report their exit status to the stage that launched them (see relaunch).
STATUS_DIR_ENV = "SCORE_PIPELINE_STATUS_DIR"


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
    world = _world()
    if world is not None and world.size > 1:
        if name not in DEVICES_KEYS:
            print(f"{name}: runs in one process; only {' and '.join(DEVICES_KEYS)} run under torchrun "
                  f"(WORLD_SIZE={world.size} here)", file=sys.stderr)
            return 2
        return run_rank(name, body, cfg, world)
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
FAMILY_STAGES = ("noise_scales", "train", "sample", "evaluate")


def _family_body(cfg: config.Config, name: str) -> Optional[StageBody]:
    """The body of stage `name` that the run's method family brings (families/<method.name>/), if it has its own."""
    import families

    return families.get(cfg.method.name).stage(name) if name in FAMILY_STAGES else None


def _world() -> Optional[distributed.World]:
    """The torchrun world of this process, or None; pipeline.distributed (torch) is imported only under torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    from pipeline import distributed

    return distributed.world_from_env(os.environ)


# The stages that log a live curve to MLflow while they work; the others record their calls and a detached
# process replays them after the stage ends (pipeline.spool), which keeps mlflow's import off their critical path.
LIVE_STAGES = ("train",)
# SCORE_PIPELINE_TRACKING=sync: every stage logs to MLflow itself, before it exits (tests, debugging).
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
    if name in LIVE_STAGES or os.environ.get(TRACKING_ENV) == "sync":
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


class SilentRun:
    """The StageRun of ranks other than 0: they log nothing (docs/design.md, "Tracking": only rank 0 logs)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("log") or name == "flush":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def check_gpus(setting: str, n: int, key: str) -> None:
    """Refuse, before launching, N processes that the node's GPUs cannot take: one GPU per process (NCCL refuses
    two ranks on one GPU). train.device cpu, or auto without CUDA, runs N CPU processes (gloo)."""
    count = cuda_count()
    if setting == "cuda" and count < n:
        raise DataError(f"{key}: {n} processes with train.device: cuda need {n} GPUs, one each; torch sees {count}")
    if setting == "auto" and 0 < count < n:
        raise DataError(f"{key}: {n} processes need {n} GPUs, one each, and torch sees {count} (train.device: auto); "
                        f"lower {key}, or set train.device: cpu for {n} CPU processes")


def relaunch(name: str, params: str, n: int, setting: str) -> int:
    """Run `python -m stages.<name> --params <params>` as N processes under torchrun on this node; its status.

    SIGTERM (SLURM's preemption notice) is forwarded to torchrun, which passes it to every rank; the ranks agree on
    the step to stop at and exit 143, which this process returns (torchrun itself would say 1). On a node with
    several GPUs the N GPUs are locked here (GpuLocks) and made the child's CUDA_VISIBLE_DEVICES, so two queued
    multi-process stages do not both take GPUs 0..N-1."""
    from pipeline import distributed

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # `-m stages.<name>` from any working directory (tests)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    count = cuda_count() if setting != "cpu" else 0
    if count > 1:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        chosen = GPU_LOCKS.acquire(count, n)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i) for i in chosen)
    cmd = distributed.torchrun_command(sys.executable, n, f"stages.{name}", ["--params", params])
    print(f"{name}: {name}.devices: {n}: {' '.join(cmd[1:])}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="score-pipeline-ranks-") as status_dir:
        env[STATUS_DIR_ENV] = status_dir
        child = subprocess.Popen(cmd, env=env)
        terminated = _wait_forwarding_sigterm(child)
        statuses = {int(f.name.removeprefix("rank")): int(f.read_text()) for f in Path(status_dir).glob("rank*")}
    return distributed.exit_status(child.returncode, statuses, terminated)


def _wait_forwarding_sigterm(child: subprocess.Popen) -> bool:
    """Wait for `child`, passing on any SIGTERM this process gets; whether one came. Ctrl-C reaches the child
    from the terminal itself (same process group); this process then waits for it to wind down."""
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: nothing to forward from
        previous = None
    try:
        while True:
            try:
                child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return bool(received)


def run_rank(name: str, body: StageBody, cfg: config.Config, world: distributed.World) -> int:
    """One rank of a stage under torchrun: join the process group (NCCL on this rank's GPU, gloo on the CPU, plus a
    gloo group for host-side values), run the body with it (rank 0 inside the MLflow stage run, the others
    silent), report the exit status to the launching stage, leave the group."""
    import torch
    import torch.distributed as dist

    from pipeline import distributed

    status = 1
    try:
        device = choose_device(cfg.train.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
            control = dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo")
            control = None
        group = distributed.Group(world.rank, world.size, device, control)
        if group.is_main:
            status = _tracked(name, cfg, lambda run: body(cfg, run, group=group))
        else:
            try:
                body(cfg, SilentRun(), group=group)
                status = 0
            except DataError:  # rank 0 says why
                status = 2
    except DataError as err:
        print(f"{name}: {err}", file=sys.stderr)
        status = 2
    except SystemExit as stop:  # e.g. 143 after preemption
        status = stop.code if isinstance(stop.code, int) else 1
        raise
    finally:
        _report_status(world.rank, status)
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


def _report_status(rank: int, status: int) -> None:
    """Leave this rank's exit status where relaunch reads it (nothing when torchrun was started by hand)."""
    where = os.environ.get(STATUS_DIR_ENV)
    if where and Path(where).is_dir():
        io.write_text(Path(where) / f"rank{rank}", str(status))


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
