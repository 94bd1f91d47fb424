"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a usable GPU: it refuses at once with one line
that names what is missing; and its parts that need no GPU: the summary writer, the step runner that records a
failure and goes on, the time limit that ends a command and its children, the parsers of pytest's and the
throughput benchmark's output. The GPU is hidden from the refusal tests (CUDA_VISIBLE_DEVICES="", a patched
torch.cuda.is_available), so they check the same thing on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import Context, Result, Step, StepFailed

REPO = Path(__file__).resolve().parents[1]


def test_make_gpu_check_refuses_at_once_without_a_gpu(tmp_path):
    """The Makefile's recipe itself (STAMP= skips the venv bootstrap, BIN= is this Python's folder)."""
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    proc = subprocess.run(["make", "-s", "gpu-check", "STAMP=", f"BIN={Path(sys.executable).parent}",
                           f"GPU_CHECK_ARGS=--out {out}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert seconds < 10, seconds
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr
    assert "NVIDIA driver" in lines[0] or "CUDA_VISIBLE_DEVICES is ''" in lines[0], lines[0]
    assert proc.stdout == "" and not out.exists()


def test_the_refusal_names_what_torch_misses(tmp_path, monkeypatch, capsys):
    """With a driver present but no device for torch, the line says so and names CUDA_VISIBLE_DEVICES; exit 2."""
    monkeypatch.setattr(gpu_check, "DRIVER_FILES", (str(tmp_path),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("gpu-check: no CUDA device: torch ") and "torch.cuda.is_available() is False" in err
    assert "CUDA_VISIBLE_DEVICES is ''" in err
    assert not (tmp_path / "out").exists()


FAKE_MACHINE = {"gpu": "NVIDIA H100 80GB HBM3", "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}],
                "torch": "2.14.1+cu130", "cuda": "13.0", "cudnn": 91900, "driver": "580.65.06"}


def fake_results() -> list[Result]:
    """One step of each kind: passed with rows and stage times, failed with an output tail, skipped with a reason."""
    rows = [{"case": "cifar10-ddpm", "batch": 128, "precision": "bf16", "compile": False, "pipeline_img_s": 2301.5,
             "bare_img_s": 2350.25, "overhead_pct": 2.1153}]
    return [
        Result("throughput", "passed", 61.3, 90, ["python -m benchmarks.throughput --device cuda"], {"rows": rows}),
        Result("digits_run", "failed", 130.0, 130, ["python -m stages.prepare --params params.yaml"],
               {"stage_seconds": {"prepare": 4.2, "noise_scales": 3.9}}, "stage evaluate: exit status 1",
               "Traceback (most recent call last):\nRuntimeError: CUDA error: out of memory"),
        Result("two_gpus", "skipped", 0.0, 50, note="1 CUDA device here: train.devices / sample.devices 2 need two"),
    ]


def test_the_summary_holds_the_machine_every_step_and_every_number(tmp_path):
    json_path, md_path = gpu_check.write_summary(tmp_path / "out", FAKE_MACHINE, fake_results(), 195.4)
    doc = json.loads(json_path.read_text())
    assert doc["machine"] == FAKE_MACHINE and doc["total_s"] == 195.4
    assert doc["passed"] is False and doc["failed"] == ["digits_run"]
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [
        ("throughput", "passed"), ("digits_run", "failed"), ("two_gpus", "skipped")]
    assert doc["steps"][0]["numbers"]["rows"][0]["pipeline_img_s"] == 2301.5
    assert doc["steps"][1]["tail"].endswith("CUDA error: out of memory")

    md = md_path.read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3\n") and "FAILED: digits_run" in md
    for text in ["| torch | 2.14.1+cu130 |", "| cuda | 13.0 |", "| driver | 580.65.06 |",
                 "| throughput | passed | 61.3 | 90 |  |",
                 "| digits_run | failed | 130.0 | 130 | stage evaluate: exit status 1 |",
                 "| two_gpus | skipped | 0.0 | 50 | 1 CUDA device here: train.devices / sample.devices 2 need two |",
                 "| case | batch | precision | compile | pipeline_img_s | bare_img_s | overhead_pct |",
                 "| cifar10-ddpm | 128 | bf16 | False | 2302 | 2350 | 2.115 |",
                 "| prepare | 4.2 |", "| noise_scales | 3.9 |",
                 "```\nTraceback (most recent call last):\nRuntimeError: CUDA error: out of memory\n```",
                 "- `python -m benchmarks.throughput --device cuda`"]:
        assert text in md, text
    assert "## two_gpus" not in md  # nothing to show beyond its row


def test_a_failed_step_is_recorded_and_the_next_one_runs(tmp_path):
    budgets = []

    def fails(ctx, budget):
        raise StepFailed("pytest: exit status 1", "1 failed, 3 passed in 2.00s", {"failed": 1, "passed": 3})

    def crashes(ctx, budget):
        raise KeyError("stage_seconds")

    def passes(ctx, budget):
        budgets.append(budget)
        return {"value": 1.5}

    ctx = Context(out=tmp_path, start=time.monotonic())
    steps = [Step("a", 5, fails), Step("b", 5, crashes), Step("c", 7, passes),
             Step("d", 5, passes, lambda ctx: "1 CUDA device here"), Step("e", 5, passes)]
    results = gpu_check.run_steps(ctx, steps)
    assert [(r.name, r.status) for r in results] == [
        ("a", "failed"), ("b", "failed"), ("c", "passed"), ("d", "skipped"), ("e", "passed")]
    assert results[0].note == "pytest: exit status 1" and results[0].tail == "1 failed, 3 passed in 2.00s"
    assert results[0].numbers == {"failed": 1, "passed": 3}
    assert results[1].note == "KeyError: 'stage_seconds'"
    assert results[2].numbers == {"value": 1.5} and results[3].note == "1 CUDA device here"
    assert budgets == [7, 5]


def test_no_step_starts_after_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DEADLINE_S", 0.0)
    results = gpu_check.run_steps(Context(out=tmp_path, start=time.monotonic()), [Step("a", 5, lambda c, b: {})])
    assert results[0].status == "skipped" and "no time left" in results[0].note


def test_the_budgets_fit_in_eight_minutes():
    """The steps' budgets fit the deadline (counted from the start, set-up included), and the deadline with the
    grace of one kill past it (a step's limit is at most the time left) and the summary 8 minutes."""
    assert [s.name for s in gpu_check.STEPS] == ["cuda_tests", "throughput", "throughput_compile", "digits_run",
                                                 "two_gpus"]
    assert sum(s.budget_s for s in gpu_check.STEPS) <= gpu_check.DEADLINE_S
    assert gpu_check.DEADLINE_S + 2 * gpu_check.KILL_GRACE_S + 10 <= 8 * 60
    docs = (REPO / "docs" / "gpus.md").read_text(encoding="utf-8")
    for step in gpu_check.STEPS:
        assert f"| `{step.name}` |" in docs and f"| {step.budget_s:.0f} s |" in docs, step.name


def test_a_time_limit_ends_the_command_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    rc, seconds, output = gpu_check.run_command([sys.executable, "-c", script], tmp_path / "log", timeout=3)
    assert rc is None and seconds < 3 + 2 * gpu_check.KILL_GRACE_S + 1
    assert "started" in output and (tmp_path / "log").read_text().startswith("$ ")
    child = int(pid_file.read_text())
    for _ in range(50):  # the child is ours no more once its parent died; wait until it is gone
        if not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child):
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child)


def _proc_state(pid: int) -> str:
    """The state letter of a process from /proc (Z: a zombie, already dead), or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def test_run_command_reports_the_exit_status_and_the_output(tmp_path):
    rc, seconds, output = gpu_check.run_command([sys.executable, "-c", "print('x'); raise SystemExit(3)"],
                                                tmp_path / "log", timeout=30)
    assert rc == 3 and output == "x\n"
    try:
        gpu_check.check(rc, seconds, output, "stage train")
    except StepFailed as err:
        assert str(err) == "stage train: exit status 3" and err.tail == "x"
    else:
        raise AssertionError("exit status 3 passed the check")


def test_pytest_counts_and_throughput_rows_are_read_from_the_output():
    assert gpu_check.pytest_counts("....F\n1 failed, 304 passed, 1925 deselected, 2 warnings in 31.20s\n") == {
        "failed": 1, "passed": 304, "deselected": 1925, "warning": 2}
    assert gpu_check.pytest_counts("ERROR collecting\n1 error in 0.50s\n") == {"error": 1}
    assert gpu_check.pytest_counts("no output\n") == {}
    row = {"case": "digits", "shape": [1, 8, 8], "batch": 128, "precision": "fp32", "compile": True,
           "pipeline_img_s": 9000.0, "bare_img_s": 9100.0, "overhead_pct": 1.1, "rounds": 1}
    output = f"{json.dumps(row)}\n{{not json\n\n| network | params |\n"
    assert gpu_check.throughput_rows(output) == [
        {"case": "digits", "batch": 128, "precision": "fp32", "compile": True, "pipeline_img_s": 9000.0,
         "bare_img_s": 9100.0, "overhead_pct": 1.1}]


def test_the_digits_run_changes_only_its_keys():
    params = gpu_check.digits_params()
    assert params["data"]["name"] == "digits" and params["train"]["device"] == "cuda"
    assert params["train"]["steps"] == 400 and params["eval"]["fid_n"] == 200
    assert params["sample"]["batch_size"] * 2 == params["eval"]["fid_n"]  # two processes, one batch each
    import yaml

    base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert params["model"] == base["model"] and params["method"] == base["method"]
    assert params["train"]["lr"] == base["train"]["lr"] and params["eval"]["n"] == base["eval"]["n"]
