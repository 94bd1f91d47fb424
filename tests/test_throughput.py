"""benchmarks/throughput.py on a tiny network: both loops run, time the chunks they were asked for, and give a row."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks import throughput


def test_cases_follow_the_preset_and_the_digits_default():
    cases = throughput._cases("cpu", quick=True, batch=None)
    ddpm, digits = cases["cifar10-ddpm"], cases["digits"]
    assert (ddpm.spec["channels"], ddpm.spec["channel_mult"], ddpm.spec["num_res_blocks"]) == (128, [1, 2, 2, 2], 2)
    assert (ddpm.lr, ddpm.ema_decay, ddpm.ema_warmup, ddpm.warmup, ddpm.hflip) == (2e-4, 0.9999, False, 5000, True)
    assert digits.spec["shape"] == [1, 8, 8] and digits.ema_warmup and digits.warmup == 0


def test_measure_tiny_network_both_loops():
    digits = throughput._cases("cpu", quick=True, batch=None)["digits"]
    case = dataclasses.replace(digits, spec={**digits.spec, "channels": 8}, batch=4, chunk=2, chunks=2)
    row = throughput.measure(case, torch.device("cpu"), "fp32", False, rounds=2)
    for loop in ("pipeline", "bare"):
        assert row[f"{loop}_img_s"] > 0
        assert [len(run) for run in row["chunk_seconds"][loop]] == [3, 3]  # 1 warm-up + 2 timed chunks, 2 rounds
    assert row["overhead_pct"] == 100 * (row["bare_img_s"] / row["pipeline_img_s"] - 1)
    assert "| digits 1x8x8 |" in throughput.table([row])
