"""Preemption (issue 8, item 5): should_stop in the library loop, SIGTERM in the train stage.

A stopped run writes a checkpoint at the step it stopped on, with everything an exact resume needs (optimizer,
EMA, generator, lr schedule, GradScaler, the global RNG dropout draws from, the partial loss sum), so the
resumed run ends on the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.losses import build_loss
from pipeline.nets.mlp import ConditionalMLP
from pipeline.nets.unet import UNet
from pipeline.processes import VPSDE
from pipeline.train import Checkpoints, Hooks, Preempted, TrainData, TrainSettings, image_batches, train
from stages.train import PREEMPTED_EXIT
from test_stages import REPO, TINY, _deep_merge, prepared_project


def _stop_at(k: int):
    """A should_stop that answers True on its k-th call (the loop asks once per step: stop after step k)."""
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) == k

    return should_stop


def _case(name: str):
    """(network factory, data, transform, settings): points with lr warm-up, log rows that do not divide the
    stop step (the partial loss sum travels in the checkpoint); images with dropout (global RNG), fp16
    (GradScaler state), two micro-batches, dequantisation and flips (the training generator), EMA warm-up."""
    if name == "points":
        data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=20, batch_size=32, lr=1e-3, grad_clip=1.0, ema_decay=0.9, checkpoint_every=8,
                                 log_every=6, seed=0, warmup=5)
        return (lambda: ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)), data, None, settings
    data = torch.randint(256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    settings = TrainSettings(steps=12, batch_size=16, lr=1e-3, grad_clip=1.0, ema_decay=0.9, checkpoint_every=100,
                             log_every=5, seed=0, ema_warmup=True, precision="fp16", accumulate=2, warmup=3)
    return ((lambda: UNet((1, 8, 8), 8, (1, 2), 1, [4], 0.1)), data,
            image_batches("zero_one", dequantize=True, hflip=True), settings)


def _train(make, data, transform, settings, ckpt_dir, should_stop=None):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial weights in every run
        net = make()
    hooks = Hooks(evaluator=lambda step, ema: {"value": float(sum(p.sum() for p in ema.parameters()))},
                  eval_every=4, should_stop=should_stop, progress=False)
    return train(net, build_loss("dsm", VPSDE(), "eps"), TrainData(data, transform), settings,
                 Checkpoints(ckpt_dir, {"case": 1}), hooks)


@pytest.mark.parametrize("case", ["points", "images"])
def test_should_stop_writes_a_checkpoint_that_resumes_exactly(tmp_path, case):
    make, data, transform, settings = _case(case)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # where dropout's global RNG starts, in both runs
        whole = _train(make, data, transform, settings, tmp_path / "whole")
        torch.manual_seed(1)
        stop = 7  # between log rows (every 5 or 6), checkpoints (8, 100) and evaluations (4)
        with pytest.raises(Preempted) as info:
            _train(make, data, transform, settings, tmp_path / "cut", should_stop=_stop_at(stop))
        assert info.value.step == stop and info.value.checkpoint == tmp_path / "cut" / "last.pt"
        ckpt = torch.load(info.value.checkpoint, weights_only=True)
        assert int(ckpt["step"]) == stop and int(ckpt["count"]) == stop % settings.log_every
        torch.manual_seed(123)  # another process: the global RNG is wherever; the checkpoint puts it back
        resumed = _train(make, data, transform, settings, tmp_path / "cut")
    assert resumed.resumed_from == stop
    for a, b in ((whole.model, resumed.model), (whole.ema, resumed.ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.loss_rows == whole.loss_rows
    assert resumed.eval_rows == whole.eval_rows


def test_no_stop_on_the_last_step_and_old_checkpoints_resume(tmp_path):
    """should_stop is not asked after the last step (the run is done); a checkpoint written before preemption
    support (no partial loss sum, no RNG state) still resumes."""
    make, data, transform, settings = _case("points")  # no dropout: the global RNG is not used
    result = _train(make, data, transform, settings, tmp_path, should_stop=_stop_at(settings.steps))
    assert result.loss_rows[-1][0] == settings.steps
    path = tmp_path / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("running", "count", "rng")}, path)
    again = _train(make, data, transform, settings, tmp_path)
    assert again.resumed_from == settings.steps and again.loss_rows == result.loss_rows


# --- the train stage in a subprocess, stopped with SIGTERM as SLURM does ---------------------------------------

# Long enough that the signal lands mid-run (~1 s of training left after the first checkpoint), short enough
# for a test; log rows every 7 steps, so the stop step almost never falls on one.
PREEMPT = _deep_merge(TINY, {"train": {"steps": 600, "batch_size": 64, "checkpoint_every": 40, "log_every": 7}})
OUTPUTS = ("models/raw.pt", "models/ema.pt", "plots/train_loss.csv", "metrics/train.json")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


_STAGE = [sys.executable, "-m", "stages.train"]


def sigterm_after_first_checkpoint(proc: subprocess.Popen, checkpoint: Path) -> str:
    """Send SIGTERM to a running train stage once it has written `checkpoint` (or ended, or 2 minutes passed);
    return its stderr after it exits."""
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=120)[1]


def resume_and_compare(cwd: Path, env: dict, step: int, reference: subprocess.Popen, whole: Path,
                       outputs) -> None:
    """Re-run the stopped train stage in `cwd`: it resumes from the checkpoint at `step`, and its `outputs` are the
    bytes of the uninterrupted `reference` run in `whole`."""
    again = subprocess.run(_STAGE, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed from the checkpoint at step {step}" in again.stdout, again.stderr
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    for name in outputs:
        assert (cwd / name).read_bytes() == (whole / name).read_bytes(), name


def _start(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(_STAGE, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_the_stage_and_the_rerun_finishes_the_same_bytes(tmp_path, monkeypatch):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cut.mkdir()
    prepared_project(cut, PREEMPT, monkeypatch)
    shutil.copytree(cut, whole)  # with the MLflow store prepare made: no schema set-up in the subprocesses

    # the uninterrupted reference runs alongside (two processes: the test takes two runs' time, not three)
    reference = _start(whole)
    proc = _start(cut)
    checkpoint = cut / "checkpoints" / "last.pt"
    err = sigterm_after_first_checkpoint(proc, checkpoint)
    assert proc.returncode == PREEMPTED_EXIT == 143, err
    step = int(torch.load(checkpoint, weights_only=True)["step"])
    assert 40 <= step < 600 and f"stopped at step {step} and wrote checkpoints/last.pt" in err
    assert not (cut / "models" / "raw.pt").exists()  # nothing but the checkpoint

    resume_and_compare(cut, _env(), step, reference, whole, OUTPUTS)
