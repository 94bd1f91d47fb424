"""`make gpu-check`: one check of a CUDA machine in at most 8 minutes, summarised in <out>/gpu_check.{json,md}.

    python -m benchmarks.gpu_check [--out gpu-check] [--only STEP ...]

The steps, in order, each under its own time limit (STEPS; docs/gpus.md, "Checking a GPU machine"):

1. cuda_tests: the tests marked `cuda` (pytest.ini) and the tests parametrised on the cuda device
   (`pytest -m "" -k cuda tests`);
2. throughput: benchmarks/throughput.py on CUDA, one round, the CIFAR-10 DDPM U-Net in fp32 and bf16, pipeline
   loop against the bare loop;
3. throughput_compile: the same on the digits U-Net, fp32 and bf16, each plain and with torch.compile;
4. digits_run: every stage of dvc.yaml as `python -m stages.<name> --params params.yaml` in <out>/digits_run/, on
   digits with train.device cuda, 400 training steps, eval.fid_n 200; the wall time of each stage;
5. two_gpus: where a second GPU is there, the digits run's sampling again with sample.devices 2 (the same bytes are
   promised) and its training with train.devices 2; skipped, with the reason, otherwise.

A step that fails or runs out of time is recorded as failed with the tail of its output, and the next one runs;
the exit status is 1 if any step failed. Without a CUDA device the script says so on one line and exits 2 before
doing anything else: at once without an NVIDIA driver (DRIVER_FILES), else after importing torch (about 3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "gpu-check"
# Steps start only before this many seconds from the start; each also stops at its own budget (STEPS).
DEADLINE_S = 450.0
KILL_GRACE_S = 3.0      # after SIGTERM at a time limit, then SIGKILL
TAIL_LINES = 30         # lines of a failed step's output kept in the summary
# Without one of these there is no NVIDIA driver, and the check refuses before importing torch (/dev/dxg: WSL 2).
DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")

# The digits run: the repository's params.yaml with these keys changed (sample.batch_size 100 lets two processes
# each draw one of the two batches of 200 samples).
DIGITS_RUN = {"data": {"name": "digits"},
              "train": {"steps": 400, "device": "cuda"},
              "sample": {"batch_size": 100},
              "eval": {"fid_n": 200, "classifier_steps": 300}}


def dvc_stages() -> list[str]:
    """The stages of dvc.yaml in its (dependency) order."""
    import yaml

    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@dataclass
class Result:
    """One step's outcome: passed, failed or skipped, its wall time, its numbers and, if failed, its output's tail."""

    name: str
    status: str
    seconds: float
    budget_s: float
    commands: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    tail: str = ""


@dataclass
class Context:
    """What every step gets: the output folder, the device, the start time and the environment of its commands."""

    out: Path
    start: float
    device: str = "cuda"
    gpus: int = 1
    results: dict[str, Result] = field(default_factory=dict)

    def remaining(self) -> float:
        """Seconds left before DEADLINE_S."""
        return DEADLINE_S - (time.monotonic() - self.start)

    def log(self, step: str) -> Path:
        """The file a step's commands write their output to."""
        return self.out / "logs" / f"{step}.log"


class StepFailed(Exception):
    """A step's command failed or ran out of time: the message, and the tail of the output."""

    def __init__(self, message: str, tail: str = "", numbers: Optional[dict] = None):
        super().__init__(message)
        self.tail, self.numbers = tail, numbers or {}


# --------------------------------------------------------------------------- the check before anything else


def missing_cuda() -> Optional[str]:
    """A one-line reason why this machine cannot run the check, or None when torch sees a CUDA device."""
    if not any(Path(p).exists() for p in DRIVER_FILES):
        return (f"gpu-check: no CUDA device: no NVIDIA driver on this machine ({', '.join(DRIVER_FILES)}: none "
                f"exists); run it on a machine with an NVIDIA GPU")
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - any import failure is the answer
        return f"gpu-check: torch does not import ({type(err).__name__}: {err})"
    if torch.cuda.is_available():
        return None
    if not torch.version.cuda:
        why = "a CPU-only build of torch"
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        why = f"CUDA_VISIBLE_DEVICES is {os.environ['CUDA_VISIBLE_DEVICES']!r}"
    else:
        why = "the NVIDIA driver is there but CUDA does not initialise"
    return (f"gpu-check: no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False: "
            f"{why}); run it on a machine with an NVIDIA GPU")


def machine() -> dict[str, Any]:
    """The card(s), torch, CUDA, cuDNN, the driver, Python, the CPU and the git commit."""
    import torch

    cards = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    info: dict[str, Any] = {
        "gpu": cards[0].name if cards else None,
        "gpus": [{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                  "capability": f"{p.major}.{p.minor}"} for p in cards],
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "driver": _driver_version(),
        "python": platform.python_version(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
    }
    return info


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version from nvidia-smi, or None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    """The CPU's model name."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _git(*args: str) -> Optional[str]:
    """The output of a git command in the repository, or None."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- running a command


def command_env() -> dict[str, str]:
    """The environment of every command: the repository importable, this Python first on PATH, and no DVC or
    MLflow variables (nothing is logged to a team server, and stages treat their folder as the project root)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def run_command(cmd: list[str], log: Path, timeout: float, cwd: Path = REPO) -> tuple[Optional[int], float, str]:
    """(exit status, or None when killed at `timeout`; seconds; its output) of one command, whose output is
    appended to `log`. It runs in its own process group, so a time limit also ends its children (torchrun's)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        offset = f.tell()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=command_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        seconds = time.monotonic() - start
    with log.open("r", encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return rc, seconds, f.read()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after KILL_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a command's output."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def check(rc: Optional[int], seconds: float, output: str, what: str, numbers: Optional[dict] = None) -> None:
    """Raise StepFailed unless the command exited 0."""
    if rc is None:
        raise StepFailed(f"{what}: stopped at its time limit after {seconds:.0f} s", tail(output), numbers)
    if rc != 0:
        raise StepFailed(f"{what}: exit status {rc}", tail(output), numbers)


# --------------------------------------------------------------------------- the steps


def cuda_tests(ctx: Context, budget: float) -> dict[str, Any]:
    """Every test marked cuda and every test parametrised on the cuda device, in one pytest run."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "-k", "cuda", "tests"]
    ctx.results["cuda_tests"].commands.append(shlex.join(cmd))
    rc, seconds, output = run_command(cmd, ctx.log("cuda_tests"), budget)
    numbers = pytest_counts(output)
    check(rc, seconds, output, "pytest", numbers)
    return numbers


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line: {'passed': 305, 'deselected': 1925, ...}."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|no tests ran)", line)]
    if not lines:
        return {}
    return {word if word.endswith("ed") else word.rstrip("s"): int(n) for n, word in
            re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)", lines[-1])}


def throughput(ctx: Context, budget: float, name: str, args: list[str]) -> dict[str, Any]:
    """benchmarks/throughput.py on CUDA with `args`, one round; its rows (also those printed before a time limit)."""
    out = ctx.out / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--device", ctx.device, "--rounds", "1", *args,
           "--out", str(out)]
    ctx.results[name].commands.append(shlex.join(cmd))
    rc, seconds, output = run_command(cmd, ctx.log(name), budget)
    numbers = {"rows": throughput_rows(output)}
    check(rc, seconds, output, "benchmarks.throughput", numbers)
    return numbers


def throughput_rows(output: str) -> list[dict[str, Any]]:
    """The rows benchmarks/throughput.py printed, one JSON object a line, with the columns of its table."""
    keys = ["case", "batch", "precision", "compile", "pipeline_img_s", "bare_img_s", "overhead_pct"]
    rows = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "case" in row:
                rows.append({k: row.get(k) for k in keys})
    return rows


def digits_params() -> dict[str, Any]:
    """The repository's params.yaml (as in the working tree, like the code) with DIGITS_RUN's keys changed."""
    import yaml

    return merge(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), DIGITS_RUN)


def merge(base: dict, extra: dict) -> dict:
    """`base` with the keys of `extra` set, nested dictionaries merged."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def write_params(folder: Path, params: dict) -> None:
    """A complete params.yaml in `folder`."""
    import yaml

    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def run_stages(ctx: Context, step: str, folder: Path, stages: list[str], deadline: float) -> dict[str, float]:
    """`python -m stages.<name> --params params.yaml` in `folder`, in order, until `deadline` (time.monotonic());
    the seconds of each stage. The first failure stops the chain (the next stages need its outputs)."""
    seconds: dict[str, float] = {}
    for name in stages:
        cmd = [sys.executable, "-m", f"stages.{name}", "--params", "params.yaml"]
        ctx.results[step].commands.append(f"(cd {folder}) {shlex.join(cmd)}")
        rc, s, output = run_command(cmd, ctx.log(step), deadline - time.monotonic(), cwd=folder)
        seconds[name] = round(s, 2)
        check(rc, s, output, f"stage {name}", {"stage_seconds": seconds})
    return seconds


def metrics_of(folder: Path, names: list[str]) -> dict[str, Any]:
    """The numbers of metrics/<name>.json in `folder`, as {'<name>.<key>': value}."""
    out = {}
    for name in names:
        path = folder / "metrics" / f"{name}.json"
        if path.is_file():
            for key, value in json.loads(path.read_text()).items():
                if isinstance(value, (int, float)):
                    out[f"{name}.{key}"] = value
    return out


def digits_run(ctx: Context, budget: float) -> dict[str, Any]:
    """Every stage on digits on the GPU in <out>/digits_run/: each stage's seconds and the run's metrics."""
    folder = ctx.out / "digits_run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params = digits_params()
    params["train"]["device"] = ctx.device
    write_params(folder, params)
    seconds = run_stages(ctx, "digits_run", folder, dvc_stages(), time.monotonic() + budget)
    return {"stage_seconds": seconds, "total_s": round(sum(seconds.values()), 2),
            "metrics": metrics_of(folder, ["train", "sample", "evaluate", "fid_reference", "classifier"])}


def two_gpus(ctx: Context, budget: float) -> dict[str, Any]:
    """The digits run's sampling with sample.devices 2 (compared with its one-process samples) and its training
    with train.devices 2, in <out>/two_gpus/."""
    import numpy as np

    first = ctx.out / "digits_run"
    folder = ctx.out / "two_gpus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for sub in ("data", "outputs", "models", "metrics"):
        shutil.copytree(first / sub, folder / sub)
    params = yaml_load(first / "params.yaml")
    one_gpu = ctx.results["digits_run"].numbers["stage_seconds"]
    deadline = time.monotonic() + budget
    write_params(folder, merge(params, {"sample": {"devices": 2}}))
    seconds = {"sample, one GPU (digits_run)": one_gpu["sample"],
               "sample, sample.devices 2": run_stages(ctx, "two_gpus", folder, ["sample"], deadline)["sample"]}
    one, two = (np.load(f / "outputs" / "samples.npz")["x"] for f in (first, folder))
    same = bool(one.shape == two.shape and np.array_equal(one, two))
    write_params(folder, merge(params, {"train": {"devices": 2}}))
    seconds["train, one GPU (digits_run)"] = one_gpu["train"]
    seconds["train, train.devices 2"] = run_stages(ctx, "two_gpus", folder, ["train"], deadline)["train"]
    numbers = {"samples_identical_to_one_gpu": same,
               "final_loss_one_gpu": metrics_of(first, ["train"]).get("train.final_loss"),
               "final_loss_two_gpus": metrics_of(folder, ["train"]).get("train.final_loss"),
               "stage_seconds": seconds}
    if not same:
        raise StepFailed("sample.devices 2 gave other samples than one process (docs/gpus.md promises the same "
                         "bytes)", numbers=numbers)
    return numbers


def yaml_load(path: Path) -> dict:
    """A YAML file's content."""
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def two_gpus_skip(ctx: Context) -> Optional[str]:
    """Why the two-GPU step cannot run here, or None."""
    if ctx.gpus < 2:
        return f"{ctx.gpus} CUDA device here: train.devices / sample.devices 2 need two"
    first = ctx.results.get("digits_run")
    if first is None or first.status != "passed":
        return "it reuses the digits run's data and model, and that step did not pass"
    return None


@dataclass(frozen=True)
class Step:
    """A step: its name, its time budget in seconds, what it runs, and why it would be skipped (None: it runs)."""

    name: str
    budget_s: float
    run: Callable[[Context, float], dict[str, Any]]
    skip: Callable[[Context], Optional[str]] = lambda ctx: None


STEPS = [
    Step("cuda_tests", 55, cuda_tests),
    Step("throughput", 90, lambda ctx, b: throughput(ctx, b, "throughput", ["--only", "cifar10-ddpm"])),
    Step("throughput_compile", 120,
         lambda ctx, b: throughput(ctx, b, "throughput_compile", ["--only", "digits", "--compile"])),
    Step("digits_run", 130, digits_run),
    Step("two_gpus", 50, two_gpus, two_gpus_skip),
]


def run_steps(ctx: Context, steps: list[Step]) -> list[Result]:
    """Each step in order under min(its budget, the time left); a failure is recorded and the next step runs."""
    for step in steps:
        result = ctx.results[step.name] = Result(step.name, "skipped", 0.0, step.budget_s)
        reason = step.skip(ctx)
        budget = min(step.budget_s, ctx.remaining())
        if reason is None and budget < 1:
            reason = f"no time left ({DEADLINE_S:.0f} s for all the steps)"
        if reason is not None:
            result.note = reason
            print(f"gpu-check: {step.name}: skipped: {reason}", flush=True)
            continue
        print(f"gpu-check: {step.name} (budget {budget:.0f} s) ...", flush=True)
        start = time.monotonic()
        try:
            result.numbers = step.run(ctx, budget)
            result.status = "passed"
        except StepFailed as err:
            result.status, result.note, result.tail, result.numbers = "failed", str(err), err.tail, err.numbers
        except Exception as err:  # noqa: BLE001 - a bug in one step must not stop the others
            result.status, result.note = "failed", f"{type(err).__name__}: {err}"
        result.seconds = round(time.monotonic() - start, 2)
        print(f"gpu-check: {step.name}: {result.status} in {result.seconds:.0f} s"
              + (f": {result.note}" if result.note else ""), flush=True)
    return [ctx.results[s.name] for s in steps]


# --------------------------------------------------------------------------- the summary


def write_summary(out: Path, info: dict[str, Any], results: list[Result], total_s: float) -> tuple[Path, Path]:
    """<out>/gpu_check.json and <out>/gpu_check.md: the machine, every step's status, time and numbers."""
    out.mkdir(parents=True, exist_ok=True)
    failed = [r.name for r in results if r.status == "failed"]
    doc = {"machine": info, "total_s": round(total_s, 2), "deadline_s": DEADLINE_S, "passed": not failed,
           "failed": failed, "steps": [asdict(r) for r in results]}
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(doc), encoding="utf-8")
    return json_path, md_path


def markdown(doc: dict[str, Any]) -> str:
    """The summary as markdown: the machine, a table of the steps, each step's numbers and failures."""
    info = doc["machine"]
    verdict = "every step passed or was skipped" if doc["passed"] else f"FAILED: {', '.join(doc['failed'])}"
    lines = [f"# GPU check: {info.get('gpu') or 'no GPU'}", "",
             f"{verdict}; {doc['total_s']:.0f} s in all (steps start only in the first {doc['deadline_s']:.0f} s).",
             "", "## Machine", "", table([{"key": k, "value": _cell(v)} for k, v in info.items()]),
             "", "## Steps", "",
             table([{"step": r["name"], "status": r["status"], "seconds": f"{r['seconds']:.1f}",
                      "budget s": f"{r['budget_s']:.0f}", "note": r["note"]} for r in doc["steps"]])]
    for r in doc["steps"]:
        if not (r["numbers"] or r["tail"] or r["commands"]):
            continue
        lines += ["", f"## {r['name']}: {r['status']}", ""]
        lines += [f"- `{c}`" for c in r["commands"]]
        lines += numbers_markdown(r["numbers"])
        if r["tail"]:
            lines += ["", "Last lines of its output:", "", "```", r["tail"], "```"]
    return "\n".join(lines) + "\n"


def numbers_markdown(numbers: dict[str, Any]) -> list[str]:
    """A step's numbers: single values in one key/value table, each dict and each list of rows in its own."""
    lines: list[str] = []
    single = [{"key": k, "value": _cell(v)} for k, v in numbers.items() if not isinstance(v, (dict, list))]
    if single:
        lines += ["", table(single)]
    for key, value in numbers.items():
        if isinstance(value, dict) and value:
            lines += ["", f"{key}:", "", table([{"key": k, "value": _cell(v)} for k, v in value.items()])]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"{key}:", "", table([{k: _cell(v) for k, v in row.items()} for row in value])]
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of rows (dicts), the columns in the order the keys first appear."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    body = ["| " + " | ".join(str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns) + " |"
            for row in rows]
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *body])


def _cell(value: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, lists and dicts as compact JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "))
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    """Refuse at once without CUDA; otherwise run the steps and write the summary; 1 if a step failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the summary and logs "
                        "(default: gpu-check/ in the repository, gitignored)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="these steps only")
    args = parser.parse_args(argv)
    start = time.monotonic()
    reason = missing_cuda()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import torch

    out = args.out.resolve()
    shutil.rmtree(out / "logs", ignore_errors=True)
    ctx = Context(out=out, start=start, gpus=torch.cuda.device_count())
    info = machine()
    print(f"gpu-check: {info['gpu']} x{ctx.gpus}, torch {info['torch']}, CUDA {info['cuda']}; "
          f"summary in {out}", flush=True)
    results = run_steps(ctx, [s for s in STEPS if not args.only or s.name in args.only])
    json_path, md_path = write_summary(out, info, results, time.monotonic() - start)
    failed = [r.name for r in results if r.status == "failed"]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in "
          f"{time.monotonic() - start:.0f} s; {md_path}, {json_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
