"""Devices (issue 8, items 3 and 4): the GPU a stage takes on a node with several (per-GPU lock files), LOCAL_RANK
under torchrun, the torchrun re-launch of train.devices / sample.devices, and what is refused before any work.

CUDA is faked (torch.cuda.is_available / device_count monkeypatched): nothing here touches a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import devices
from pipeline.data import DataError
from pipeline.devices import GpuLocks, check_gpus
from pipeline.train import check_train
from stages import launch
from stages.common import run_named
from stages.launch import choose_device
from test_stages import TINY, _deep_merge, _write_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """fake(n): torch sees n CUDA devices; lock files under tmp_path; a fresh lock holder for the stage process."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setattr(launch, "GPU_LOCKS", GpuLocks())
    return fake


def test_two_holders_take_different_gpus_and_a_released_one_is_reused(gpus, tmp_path):
    gpus(3)
    a, b, c = GpuLocks(), GpuLocks(), GpuLocks()
    assert a.acquire(3) == [0] and b.acquire(3) == [1]
    assert a.acquire(3) == [0]  # a holder keeps its GPU
    assert (tmp_path / "locks" / "score-pipeline-gpu-0.lock").is_file()
    a.release()
    assert c.acquire(3) == [0]  # the released lock is taken again


def test_every_gpu_taken_shares_one_and_says_so(gpus, capsys):
    gpus(2)
    holders = [GpuLocks(), GpuLocks()]
    assert sorted(h.acquire(2)[0] for h in holders) == [0, 1]
    late = GpuLocks()
    assert late.acquire(2)[0] in (0, 1)
    assert "every GPU of this node is held by another pipeline stage" in capsys.readouterr().err
    assert late.held[0][1] is None  # shared: no lock file held


def test_a_lock_held_by_another_process_is_skipped(gpus, tmp_path):
    gpus(2)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.devices import GpuLocks
        holder = GpuLocks()
        print(holder.acquire(2)[0], flush=True)
        sys.stdin.read()  # hold it until the test closes stdin
    """)
    env = {**os.environ, devices.LOCK_DIR_ENV: str(tmp_path / "locks")}
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert other.stdout.readline().strip() == "0"
        assert GpuLocks().acquire(2) == [1]
    finally:
        other.communicate("", timeout=60)
    assert GpuLocks().acquire(2) == [0]  # the process ended: the OS released its lock


def test_lock_files_follow_cuda_visible_devices(gpus, monkeypatch, tmp_path):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    holder = GpuLocks()
    assert holder.acquire(2) == [0] and holder.path(0).name == "score-pipeline-gpu-5.lock"


def test_choose_device(gpus, monkeypatch):
    gpus(0)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(DataError, match="no CUDA device"):
        choose_device("cuda")
    gpus(1)
    assert choose_device("auto") == torch.device("cuda") and not launch.GPU_LOCKS.held  # one GPU: no lock
    assert choose_device("cpu") == torch.device("cpu")
    gpus(3)
    other = GpuLocks()
    other.acquire(3)  # another stage holds GPU 0
    assert choose_device("auto") == torch.device("cuda", 1)
    assert choose_device("cuda") == torch.device("cuda", 1)  # the same stage process keeps its GPU
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert choose_device("auto") == torch.device("cuda", 2)  # torchrun: LOCAL_RANK's GPU, no lock
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DataError, match="LOCAL_RANK 3.*torch sees 3 CUDA device"):
        choose_device("auto")


# --------------------------------------------------------------------------- refused before any work


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def _params(extra: dict) -> None:
    _write_params(Path("params.yaml"), _deep_merge(TINY, extra))


def test_batch_not_divisible_by_the_processes_is_refused(workdir, capsys):
    _params({"train": {"batch_size": 64, "devices": 3}})
    for name in ("prepare", "train", "sample"):
        assert run_named(name, ["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size (64) must be a multiple of train.devices x train.accumulate (3 x 1)" in err, err
    assert not Path("data").exists()
    _params({"train": {"batch_size": 64, "devices": 2, "accumulate": 4}})  # 64 / 4 = 16 rows per micro-batch: ok
    from pipeline import config

    assert config.load("params.yaml").train.devices == 2
    # an 'auto' batch size, or a world size torchrun set, is checked once resolved
    with pytest.raises(DataError, match=r"multiple of train.devices x train.accumulate \(3 x 4\)"):
        check_train(config.load("params.yaml").train, 64, "dsm", world_size=3)


@pytest.mark.parametrize("device, count", [("cuda", 0), ("cuda", 1), ("auto", 1)])
def test_more_processes_than_gpus_is_refused_with_the_counts(workdir, gpus, monkeypatch, capsys, device, count):
    gpus(count)
    _params({"train": {"device": device, "devices": 2}, "sample": {"devices": 2}})
    launched = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: launched.append(a))
    assert run_named("train", ["--params", "params.yaml"]) == 2
    assert run_named("sample", ["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "train.devices: 2 processes" in err and f"torch sees {count}" in err and "sample.devices: 2" in err, err
    assert not launched
    with pytest.raises(DataError):
        check_gpus(device, 2, "train.devices")
    check_gpus("cpu", 2, "train.devices")  # N CPU processes (gloo)


def test_stages_without_devices_refuse_torchrun(workdir, monkeypatch, capsys):
    _params({})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_named("evaluate", ["--params", "params.yaml"]) == 2
    assert "only train and sample run under torchrun" in capsys.readouterr().err


class _FakeTorchrun:
    """Stands in for subprocess.Popen in relaunch: records the command and environment, lets each rank 'report' a
    status, and exits with torchrun's code."""

    def __init__(self, statuses: dict, returncode: int):
        self.statuses, self.code, self.calls = statuses, returncode, []

    def __call__(self, cmd, env):
        self.calls.append((cmd, env))
        for rank, status in self.statuses.items():
            Path(env[launch.STATUS_DIR_ENV], f"rank{rank}").write_text(str(status))
        fake = self

        class Child:
            returncode = fake.code

            def wait(self):
                return self.returncode

            def poll(self):
                return self.returncode

        return Child()


@pytest.mark.parametrize("statuses, returncode, expected", [({0: 0, 1: 0}, 0, 0), ({0: 143, 1: 143}, 1, 143),
                                                            ({0: 2, 1: 2}, 1, 2)])
def test_relaunch_runs_torchrun_and_returns_the_ranks_status(workdir, gpus, monkeypatch, statuses, returncode,
                                                             expected):
    gpus(4)
    other = GpuLocks()
    other.acquire(4)  # another stage holds GPU 0
    fake = _FakeTorchrun(statuses, returncode)
    monkeypatch.setattr(launch.subprocess, "Popen", fake)
    _params({"train": {"devices": 2}})
    assert run_named("train", ["--params", "params.yaml"]) == expected
    (cmd, env), = fake.calls
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stages.train",
                       "--params", "params.yaml"]
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"  # two free GPUs, locked for the child's lifetime
    assert str(REPO) in env["PYTHONPATH"].split(":")
