"""One data set's image goal, measured as docs/images.md quotes it: a fresh clone, an empty DVC cache, one command.

    python -m benchmarks.goal --data digits [--set KEY=VALUE ...] [--out benchmarks/goal_digits.json] [--keep DIR]

Clones the committed HEAD of this repository into a temporary folder (uncommitted changes are not measured: the
script says so), runs `dvc exp run -n goal -S data.name=DATA [-S KEY=VALUE ...]` there with this interpreter's
environment (the clone's DVC cache starts empty, so every stage runs, the reference stages included), and times it
end to end and stage by stage (from the moment DVC announces a stage to the next announcement or the end: the
stage's process start included). The record names the CPU and whether it computes bf16 natively
(`pipeline.devices.bf16_native`: `train.precision: auto` follows it), the metrics of the run (`fid` against its
floor, `fid_domain`, `kid`) and the data set's goal (GOALS), met or not. It prints a table row and writes the JSON
record to --out. The run's MLflow records stay in the clone's own store, as in a user's fresh clone (--keep keeps
the clone). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from benchmarks.gpu_check import _cpu_name

REPO = Path(__file__).resolve().parents[1]
# The image goals on the 2-core CPU (docs/benchmarks.md): wall seconds of the whole command, fid / fid_floor.
GOALS = {"digits": {"wall_s": 360.0, "fid_ratio": 1.1}, "fashion_mnist": {"wall_s": 3600.0, "fid_ratio": 2.0}}
METRIC_FILES = ("metrics/fid_reference.json", "metrics/classifier.json", "metrics/evaluate.json")
STAGE_PREFIX = "Running stage '"


def stage_seconds(lines: Iterable[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per stage from (time, line) pairs of a `dvc exp run` log: from "Running stage 'X'" to the next such
    line, the last stage to `end`."""
    starts = [(t, line.split(STAGE_PREFIX, 1)[1].split("'", 1)[0]) for t, line in lines if STAGE_PREFIX in line]
    bounds = [t for t, _ in starts[1:]] + [end]
    return {name: round(stop - start, 1) for (start, name), stop in zip(starts, bounds)}


def verdict(data: str, wall_s: float, metrics: dict) -> dict:
    """The goal of `data` (GOALS) against a run: fid_ratio = fid / fid_floor, and whether each bound is met."""
    goal = GOALS[data]
    ratio = metrics["fid"] / metrics["fid_floor"]
    return {"goal": goal, "fid_ratio": round(ratio, 4),
            "met": {"wall_s": wall_s <= goal["wall_s"], "fid_ratio": ratio <= goal["fid_ratio"]}}


def row(record: dict) -> str:
    """A markdown table row: data, sets, wall, fid / floor, fid_domain, met."""
    m, v = record["metrics"], record["verdict"]
    sets = " ".join(f"-S {s}" for s in record["sets"]) or "–"
    met = ", ".join(k for k, ok in v["met"].items() if ok) or "none"
    return (f"| {record['data']} | {sets} | {record['wall_s'] / 60:.1f} min | {m['fid']:.2f} / {m['fid_floor']:.2f}"
            f" = {v['fid_ratio']:.2f}x | {m.get('fid_domain', float('nan')):.2f} | {met} |")


def _bf16_native() -> bool:
    import torch

    from pipeline.devices import bf16_native

    return bf16_native(torch.device("cpu"))


def _run_timed(cmd: list[str], cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]], float]:
    """Run `cmd`, echoing its output, and return its exit code, each output line with the time it arrived, and
    the end time."""
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            print(line, end="", flush=True)
    return proc.returncode, lines, time.monotonic()


def measure(data: str, sets: list[str], keep: Optional[Path] = None) -> dict:
    """Clone HEAD, run the goal command there on an empty DVC cache, and return its record."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty:
        print("goal: uncommitted changes are not measured: the clone holds the committed HEAD", file=sys.stderr)
    parent = Path(tempfile.mkdtemp(prefix="goal-")) if keep is None else keep
    clone = parent / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        # not gpu_check.command_env: its PYTHONPATH names this checkout, and the clone's own code is what is measured
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "-n", "goal", "-S", f"data.name={data}"]
        cmd += [a for s in sets for a in ("-S", s)]
        start = time.monotonic()
        code, lines, end = _run_timed(cmd, clone, env)
        if code != 0:
            raise SystemExit(f"goal: `{' '.join(cmd[1:])}` exited with {code}")
        metrics: dict = {}
        for name in METRIC_FILES:
            metrics.update(json.loads((clone / name).read_text()))
        wall = end - start
        keys = ("fid", "fid_floor", "fid_domain", "fid_domain_floor", "kid", "kid_floor", "fid_n")
        return {"data": data, "sets": sets, "command": " ".join(["dvc", *cmd[3:]]), "commit": head.stdout.strip(),
                "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "bf16_native": _bf16_native(),
                "wall_s": round(wall, 1), "stage_s": stage_seconds(lines, end),
                "metrics": {k: metrics[k] for k in keys if k in metrics}, "verdict": verdict(data, wall, metrics)}
    finally:
        if keep is None:
            shutil.rmtree(parent, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, choices=sorted(GOALS))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="another -S of the dvc exp run (repeatable)")
    parser.add_argument("--out", type=Path, help="the JSON record (default: benchmarks/goal_<data>.json)")
    parser.add_argument("--keep", type=Path, help="clone into this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    bad = [s for s in args.sets if "=" not in s or s.startswith("data.name=")]
    if bad:
        parser.error(f"--set takes KEY=VALUE other than data.name (that is --data), got {bad}")
    if args.keep is not None and (args.keep / "clone").exists():
        parser.error(f"--keep {args.keep}: {args.keep / 'clone'} exists already; give another folder")
    record = measure(args.data, args.sets, args.keep)
    out = args.out or REPO / "benchmarks" / f"goal_{args.data}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("| data | -S | wall | fid / floor | fid_domain | goals met |\n|---|---|---|---|---|---|")
    print(row(record))
    print(f"stages (s): {record['stage_s']}; CPU: {record['cpu']} ({record['cpu_count']} cores, bf16 native: "
          f"{record['bf16_native']}); record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
