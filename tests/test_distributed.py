"""Several processes (issue 8, items 2 and 4): train.devices and sample.devices on gloo CPU processes.

Tests that start two processes have `two_processes` in their name (`pytest -k two_processes`). The library tests
run this file as a script, one process per rank, joined by a gloo group over a file store; the stage tests go
through the stage's own torchrun re-launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a rank's script: the repository on the path, as pytest has it
    sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pipeline import distributed  # noqa: E402
from pipeline.distributed import Group, ShardRows, exit_status, shard  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.nets.mlp import ConditionalMLP  # noqa: E402
from pipeline.nets.unet import UNet  # noqa: E402
from pipeline.processes import VPSDE  # noqa: E402
from pipeline.train import (Checkpoints, Hooks, Preempted, TrainData, TrainSettings, image_batches,  # noqa: E402
                            train)

# Final weights of N processes against one (max |difference|, float32 weights of size ~0.5 .. 17), measured here:
# the tiny MLP 1.2e-7 after 200 Adam steps; the tiny U-Net 3.9e-5 after 12. Not bit-identical: the all_reduce adds
# the ranks' gradients in its own order, the mean over B/N rows is another sum than over B, and GEMMs of B/N rows
# block their sums differently (the gradients agree to ~1e-6 relative). The U-Net's zero-initialised output layer
# leaves its deeper gradients near 0 in the first steps, where Adam's g / sqrt(v) turns their rounding into steps of
# up to lr (1e-3): hence a tolerance of lr / 10 there, and 10x the measured difference for the MLP.
WEIGHT_ATOL = {"mlp": 1e-6, "unet": 1e-4}
LOSS_RTOL = 1e-5


# --------------------------------------------------------------------------- pure pieces


def test_shard_covers_every_row_once_in_order():
    for total in (0, 1, 7, 64, 301):
        for n in (1, 2, 3, 5):
            rows = [list(range(total))[shard(total, r, n)] for r in range(n)]
            assert sum(rows, []) == list(range(total))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard(10, 2, 2)


def test_shard_rows_evaluates_only_its_rows():
    net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8)
    x, c = torch.randn(6, 2), torch.rand(6)
    out = ShardRows(net, 1, 2)(x, c)
    assert out.shape == (6, 2) and torch.equal(out[:3], torch.zeros(3, 2))
    torch.testing.assert_close(out[3:], net(x[3:], c[3:]))


def test_shard_rows_gives_each_row_its_own_label():
    net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8, num_classes=3)
    x, c, y = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 3, 2, 1])
    out = ShardRows(net, 1, 2)(x, c, y)
    torch.testing.assert_close(out[3:], net(x[3:], c[3:], y[3:]))


def test_exit_status_prefers_the_ranks_word():
    assert exit_status(0, {0: 0, 1: 0}, False) == 0
    assert exit_status(1, {0: 143, 1: 143}, True) == 143  # torchrun says 1 after a signal; the ranks say 143
    assert exit_status(1, {0: 0, 1: 2}, False) == 2
    assert exit_status(1, {}, True) == 143  # SIGTERM before any rank could report
    assert exit_status(-9, {}, False) == 137
    assert exit_status(1, {0: 0}, False) == 1


def test_world_from_env():
    assert distributed.world_from_env({}) is None
    w = distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.local_rank, w.size) == (3, 1, 4)


# --------------------------------------------------------------------------- the loop on two gloo processes


def _case(name: str):
    """(network factory, data, transform, settings, stop step on rank 1 or None)."""
    if name in ("mlp", "mlp_stop", "mlp_whole"):
        data = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
        steps = 200 if name == "mlp" else 60
        settings = TrainSettings(steps=steps, batch_size=64, lr=1e-3, grad_clip=1.0, ema_decay=0.9,
                                 checkpoint_every=1000, log_every=20 if name == "mlp" else 7, seed=0, warmup=5)
        return (lambda: ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)), data, None, settings, (
            25 if name == "mlp_stop" else None)
    # images: dequantisation and flips (the transform's draws), two micro-batches, EMA warm-up; no dropout (its
    # masks come from each rank's global RNG and cannot follow one process)
    data = torch.randint(256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    settings = TrainSettings(steps=12, batch_size=16, lr=1e-3, grad_clip=1.0, ema_decay=0.9, checkpoint_every=100,
                             log_every=4, seed=0, ema_warmup=True, accumulate=2, warmup=3)
    return ((lambda: UNet((1, 8, 8), 8, (1, 2), 1, [4], 0.0)), data,
            image_batches("zero_one", dequantize=True, hflip=True), settings, None)


def _rank_main(case: str, rank: int, world: int, store: str, out: str) -> None:
    """One rank (or the single process, world 1) of `case`: train, resume once if stopped, save what it ended with."""
    import torch.distributed as dist

    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        group = Group(rank, world)
    make, data, transform, settings, stop_at = _case(case)
    ckpt_dir = Path(out) / f"ckpt_{case}_{world}"
    calls = []

    def should_stop() -> bool:  # only rank 1 is told to stop: the ranks must agree anyway
        calls.append(1)
        return rank == 1 and len(calls) == stop_at

    def run():
        torch.manual_seed(0)
        return train(make(), build_loss("dsm", VPSDE(), "eps"), TrainData(data, transform), settings,
                     Checkpoints(ckpt_dir, {"case": case}), Hooks(should_stop=should_stop, progress=False),
                     group=group)

    stopped = None
    try:
        result = run()
    except Preempted as p:
        stopped = p.step
        ckpt = torch.load(p.checkpoint, weights_only=True) if rank == 0 else None
        torch.manual_seed(123)  # another process: the checkpoint puts every rank's global RNG back
        result = run()
        if rank == 0:
            assert ckpt["world_size"] == world and len(ckpt["ranks"]) == world and int(ckpt["step"]) == stopped
    torch.save({"model": result.model.state_dict(), "ema": result.ema.state_dict(), "rows": result.loss_rows,
                "stopped": stopped, "resumed_from": result.resumed_from}, Path(out) / f"{case}_{world}_{rank}.pt")
    if group is not None:
        dist.destroy_process_group()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_ranks(out: Path, jobs: list[tuple[str, int]]) -> None:
    """Start every (case, world) job's ranks at once, as scripts of this file; wait for all."""
    procs = []
    for case, world in jobs:
        store = out / f"store_{case}_{world}"
        for rank in range(world):
            procs.append(subprocess.Popen([sys.executable, __file__, case, str(rank), str(world), str(store),
                                           str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    try:  # ~40 s on two idle cores; the timeout only guards against a hang
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log


def _load(out: Path, case: str, world: int, rank: int = 0) -> dict:
    return torch.load(out / f"{case}_{world}_{rank}.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_two_processes_follow_one_process(tmp_path):
    """The same global batch on 2 gloo processes and on 1: 200 steps of the tiny MLP and 12 of a tiny U-Net with
    flips, dequantisation and 2 micro-batches end on the same weights within WEIGHT_ATOL, the loss rows within
    LOSS_RTOL; the two ranks hold the same weights bit for bit."""
    _run_ranks(tmp_path, [("mlp", 1), ("mlp", 2), ("unet", 1), ("unet", 2)])
    for case in ("mlp", "unet"):
        one, two, other = _load(tmp_path, case, 1), _load(tmp_path, case, 2), _load(tmp_path, case, 2, 1)
        for part in ("model", "ema"):
            assert _max_diff(one[part], two[part]) < WEIGHT_ATOL[case], (case, part, _max_diff(one[part], two[part]))
            assert _max_diff(two[part], other[part]) == 0.0
        steps, losses = zip(*one["rows"])
        assert [s for s, _ in two["rows"]] == list(steps)
        np.testing.assert_allclose([v for _, v in two["rows"]], losses, rtol=LOSS_RTOL)
        print(case, "max |w_2 - w_1|:", _max_diff(one["model"], two["model"]), _max_diff(one["ema"], two["ema"]))


def test_two_processes_stop_together_and_resume_exactly(tmp_path):
    """Only rank 1 is asked to stop (at step 25): both stop there, rank 0 writes a checkpoint with the world size
    and both ranks' states, and the resumed run ends on the bytes of an uninterrupted 2-process run."""
    _run_ranks(tmp_path, [("mlp_stop", 2), ("mlp_whole", 2)])
    cut, whole = _load(tmp_path, "mlp_stop", 2), _load(tmp_path, "mlp_whole", 2)
    assert cut["stopped"] == 25 and cut["resumed_from"] == 25 and whole["stopped"] is None
    for part in ("model", "ema"):
        assert _max_diff(cut[part], whole[part]) == 0.0
    assert cut["rows"] == whole["rows"]


def test_checkpoint_of_another_world_size_starts_over(tmp_path):
    make, data, transform, settings, _ = _case("mlp_whole")
    loss = build_loss("dsm", VPSDE(), "eps")
    torch.manual_seed(0)
    ckpts, quiet = Checkpoints(tmp_path, {"case": 1}), Hooks(progress=False)
    first = train(make(), loss, TrainData(data), settings, ckpts, quiet)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**ckpt, "world_size": 2}, tmp_path / "last.pt")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) at step 60 and this run has 1"):
        again = train(make(), loss, TrainData(data), settings, ckpts, quiet)
    assert again.resumed_from == 0 and again.loss_rows == first.loss_rows
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own checkpoint (world size 1) resumes without a word
        assert train(make(), loss, TrainData(data), settings, ckpts, quiet).resumed_from == 60


def test_library_refuses_uneven_shares():
    _, data, _, settings, _ = _case("mlp_whole")
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        train(ConditionalMLP(2, 8, 1, 8), build_loss("dsm", VPSDE(), "eps"), TrainData(data), settings,
              Checkpoints(Path("unused"), {}), group=Group(0, 3))


# --------------------------------------------------------------------------- the stages under torchrun

from stages.common import run_named  # noqa: E402
from stages.train import PREEMPTED_EXIT  # noqa: E402
from test_preempt import OUTPUTS, resume_and_compare, sigterm_after_first_checkpoint  # noqa: E402


def _stage_env() -> dict:
    env = {k: v for k, v in _env().items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")}
    return env


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tiny project (test_stages' TINY params) in tmp_path, prepared, with its noise scales."""
    from test_stages import TINY, prepared_project

    return prepared_project(tmp_path, TINY, monkeypatch)


def _params(path: Path, extra: dict) -> None:
    from test_stages import TINY, _deep_merge, _write_params

    _write_params(path, _deep_merge(TINY, extra))


def test_two_processes_sample_the_same_bytes(project):
    """sample.devices 2 writes the bytes of sample.devices 1: with 6 batches (3 per rank) and with 1 batch (rank 1
    draws it, rank 0 has none)."""
    for name in ("train", "ema", "distill"):
        assert run_named(name, ["--params", "params.yaml"]) == 0
    got = {}
    for batch in (50, 300):
        for devices in (1, 2):
            _params(project / "params.yaml", {"sample": {"batch_size": batch, "devices": devices}})
            assert run_named("sample", ["--params", "params.yaml"]) == 0
            got[batch, devices] = Path("outputs/samples.npz").read_bytes()
            assert json.loads(Path("metrics/sample.json").read_text())["n"] == 300
    assert got[50, 2] == got[50, 1] and got[300, 2] == got[300, 1]


PREEMPT = {"train": {"steps": 600, "batch_size": 64, "checkpoint_every": 40, "log_every": 7, "devices": 2}}


def test_two_processes_sigterm_and_rerun_end_on_the_same_bytes(project, tmp_path):
    """SIGTERM to the train stage running 2 gloo processes under torchrun: exit 143 with a checkpoint; the re-run
    resumes and ends on the bytes of an uninterrupted 2-process run (started alongside)."""
    _params(project / "params.yaml", PREEMPT)
    whole = tmp_path.parent / f"{tmp_path.name}_whole"
    shutil.copytree(project, whole)
    stage = [sys.executable, "-m", "stages.train"]
    reference = subprocess.Popen(stage, cwd=whole, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    proc = subprocess.Popen(stage, cwd=project, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = project / "checkpoints" / "last.pt"
    err = sigterm_after_first_checkpoint(proc, checkpoint)
    assert proc.returncode == PREEMPTED_EXIT, err
    ckpt = torch.load(checkpoint, weights_only=True)
    step = int(ckpt["step"])
    assert 40 <= step < 600 and ckpt["world_size"] == 2 and f"stopped at step {step}" in err, err
    assert not (project / "models" / "raw.pt").exists()

    resume_and_compare(project, _stage_env(), step, reference, whole, OUTPUTS)


if __name__ == "__main__":
    case, rank, world, store, out = sys.argv[1:]
    _rank_main(case, int(rank), int(world), store, out)
