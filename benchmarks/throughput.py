"""Training throughput: images/s of the pipeline's training loop against a bare PyTorch loop; a markdown table.

    python -m benchmarks.throughput [--device cpu|cuda] [--only cifar10-ddpm digits] [--precision fp32 bf16]
                                    [--compile] [--rounds 3] [--batch N] [--quick] [--out benchmarks/throughput.json]

Two networks: the DDPM CIFAR-10 U-Net of presets/ddpm-cifar10.yaml (3x32x32, 35,746,307 parameters, the
preset's EMA 0.9999 without warm-up, lr warm-up and flips) and the U-Net `auto` gives digits (1x8x8,
pipeline/defaults.py, EMA 0.999 with warm-up). Both train with eps_mse on DDPM's DiscreteVP (T = 1000),
Adam, gradient clipping at norm 1 and the EMA, on random uint8 images of that shape:

- "pipeline": pipeline.train.train, as the train stage calls it (its batch draw and pixel transform, autocast,
  the loss summed on the device, LambdaLR warm-up, the EMA's multi_avg_fn, its bookkeeping; progress bar off);
- "bare": the plainest loop of the same model, loss object and optimizer: index draw, uint8 -> [-1, 1] on the
  device, autocast when asked, backward, clip_grad_norm_, Adam, AveragedModel(get_ema_multi_avg_fn(decay)).

Each run takes `chunk` steps between timestamps (the pipeline's log rows, train.log_every = chunk, read by
on_log; the bare loop's loss.item()): one host sync per chunk in both. The first chunk(s) are warm-up
(allocation, torch.compile) and dropped; a run's rate is batch * chunk / the median chunk time. Each round
runs both loops on fresh copies of the same initial network, in alternating order, and the table reports the
median over rounds (min-max in the JSON). overhead = bare rate / pipeline rate - 1: the extra time per image
the pipeline's loop costs (goal <= 5 %). The pipeline's final checkpoint (written after its last log row) and
the set-up before the first step are outside every timed chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import defaults, nets
from pipeline.losses import build_loss
from pipeline.processes import build_process
from pipeline.train import PRECISIONS, Checkpoints, Hooks, TrainData, TrainSettings, image_batches, train

REPO = Path(__file__).resolve().parents[1]
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Case:
    """One network and its training setting; batch / chunk / chunks per device and mode (quick)."""

    name: str
    shape: tuple[int, int, int]
    spec: dict
    lr: float
    ema_decay: float
    ema_warmup: bool
    warmup: int
    hflip: bool
    batch: int
    chunk: int          # steps between timestamps
    chunks: int         # timed chunks per run (after the warm-up chunks)


def _cases(device: str, quick: bool, batch: Optional[int]) -> dict[str, Case]:
    """The DDPM CIFAR-10 preset's network and the digits default, sized for the device."""
    import presets

    params = (REPO / "params.yaml").read_text(encoding="utf-8")
    ddpm = presets.apply("ddpm-cifar10", params)[1]
    cifar_info = {"kind": "images", "shape": [3, 32, 32]}
    cifar_spec = defaults.network_spec(ddpm.model.model_dump(), cifar_info, "eps")
    digits_info = {"kind": "images", "shape": [1, 8, 8]}
    base = presets.validate_text(params)
    digits_spec = defaults.network_spec(base.model.model_dump(), digits_info, "eps")
    digits_train = defaults.train_settings(base.train.model_dump(), digits_info)
    gpu = device == "cuda"
    # (batch, chunk, chunks): on 2 CPU cores a full run (fp32 and bf16, 3 rounds) takes about 10 minutes
    digits_batch = digits_train["batch_size"]  # 128, the digits default
    cifar = (2, 1, 2) if quick else ((128, 20, 5) if gpu else (16, 2, 3))
    digits = (32, 2, 2) if quick else ((digits_batch, 50, 5) if gpu else (digits_batch, 10, 3))
    return {
        "cifar10-ddpm": Case("cifar10-ddpm", (3, 32, 32), cifar_spec, float(ddpm.train.lr), ddpm.train.ema_decay,
                             bool(ddpm.train.ema_warmup), ddpm.train.warmup, ddpm.data.hflip,
                             batch or cifar[0], cifar[1], cifar[2]),
        "digits": Case("digits", (1, 8, 8), digits_spec, float(digits_train["lr"]), base.train.ema_decay,
                       bool(digits_train["ema_warmup"]), base.train.warmup, base.data.hflip,
                       batch or digits[0], digits[1], digits[2]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(net: nn.Module, loss: Callable, data: torch.Tensor, case: Case, device: torch.device,
                 precision: str, compile_: bool, warm: int) -> list[float]:
    """Seconds per chunk of pipeline.train.train (the first `warm` chunks included; the caller drops them)."""
    stamps: list[float] = []

    def on_log(step: int, mean: float) -> None:  # after the loop's float(running): the device is synced
        stamps.append(time.perf_counter())

    settings = TrainSettings(case.chunk * (warm + case.chunks), case.batch, case.lr, GRAD_CLIP, case.ema_decay,
                             checkpoint_every=10**9, log_every=case.chunk, seed=0, ema_warmup=case.ema_warmup,
                             precision=precision, compile=compile_, warmup=case.warmup)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        _sync(device)
        start = time.perf_counter()
        train(net, loss, TrainData(data, image_batches("minus_one_one", hflip=case.hflip)), settings,
              Checkpoints(Path(tmp), {"benchmark": case.name}), Hooks(on_log=on_log, progress=False), device=device)
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


def run_bare(net: nn.Module, loss: Callable, data: torch.Tensor, case: Case, device: torch.device,
             precision: str, compile_: bool, warm: int) -> list[float]:
    """Seconds per chunk of the plainest loop of the same model, loss, optimizer, clip and EMA."""
    net.to(device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=case.lr)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(case.ema_decay), use_buffers=True)
    fwd = torch.compile(net) if compile_ else net
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    dtype = PRECISIONS[precision]
    gen = torch.Generator().manual_seed(0)
    stamps: list[float] = []
    _sync(device)
    start = time.perf_counter()
    for step in range(1, case.chunk * (warm + case.chunks) + 1):
        idx = torch.randint(len(data), (case.batch,), generator=gen)
        x = data[idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if case.hflip:
            flip = (torch.rand(case.batch, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            value = loss(fwd, x, generator=gen).float().mean()
        if scaler is None:
            value.backward()
            nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            opt.step()
        else:
            scaler.scale(value).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            scaler.step(opt)
            scaler.update()
        ema.update_parameters(net)
        if step % case.chunk == 0:
            value.item()  # one host sync per chunk, as the pipeline's log row
            stamps.append(time.perf_counter())
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


LOOPS = {"pipeline": run_pipeline, "bare": run_bare}


def measure(case: Case, device: torch.device, precision: str, compile_: bool, rounds: int,
            warm: int = 1) -> dict[str, Any]:
    """Both loops, `rounds` times each in alternating order, on fresh copies of one initial network; a row."""
    net0 = nets.build_network(case.spec, seed=0)
    loss = build_loss("eps_mse", build_process("discrete_vp", sigmas=[], num_steps=1000), "eps")
    data = torch.randint(0, 256, (max(8 * case.batch, 256), *case.shape), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in LOOPS}
    chunk_s: dict[str, list[list[float]]] = {name: [] for name in LOOPS}
    for r in range(rounds):
        for name in (("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")):
            seconds = LOOPS[name](copy.deepcopy(net0), loss, data, case, device, precision, compile_, warm)
            timed = seconds[warm:]
            chunk_s[name].append([round(s, 6) for s in seconds])
            rates[name].append(case.batch * case.chunk / statistics.median(timed))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    pipe, bare = statistics.median(rates["pipeline"]), statistics.median(rates["bare"])
    return {"case": case.name, "shape": list(case.shape), "params": sum(p.numel() for p in net0.parameters()),
            "batch": case.batch, "chunk": case.chunk, "timed_chunks": case.chunks, "warm_chunks": warm,
            "rounds": rounds, "device": device.type, "precision": precision, "compile": compile_,
            "pipeline_img_s": pipe, "bare_img_s": bare, "overhead_pct": 100.0 * (bare / pipe - 1.0),
            "pipeline_img_s_range": [min(rates["pipeline"]), max(rates["pipeline"])],
            "bare_img_s_range": [min(rates["bare"]), max(rates["bare"])], "chunk_seconds": chunk_s}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| network | params | batch | device | precision | compile | pipeline img/s | bare img/s | overhead |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['case']} {'x'.join(map(str, r['shape']))} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['device']} | "
        f"{r['precision']} | {'yes' if r['compile'] else 'no'} | {r['pipeline_img_s']:.4g} "
        f"({r['pipeline_img_s_range'][0]:.4g}-{r['pipeline_img_s_range'][1]:.4g}) | {r['bare_img_s']:.4g} "
        f"({r['bare_img_s_range'][0]:.4g}-{r['bare_img_s_range'][1]:.4g}) | {r['overhead_pct']:+.1f} % |"
        for r in rows)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="*", choices=["cifar10-ddpm", "digits"], help="networks (default: both)")
    parser.add_argument("--precision", nargs="*", choices=list(PRECISIONS), default=["fp32", "bf16"],
                        help="autocast variants (default: fp32 bf16; fp16 adds a GradScaler)")
    parser.add_argument("--compile", action="store_true", help="also each precision with torch.compile (inductor)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of both loops (default 3; --quick 1)")
    parser.add_argument("--batch", type=int, help="one batch size for every network (default per network/device)")
    parser.add_argument("--quick", action="store_true", help="tiny batches, 2 timed chunks, 1 round: checks the "
                        "script and times a step; writes JSON only with --out")
    parser.add_argument("--out", help="JSON rows (default benchmarks/throughput.json; --quick: none)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    rounds = args.rounds or (1 if args.quick else 3)
    cases = _cases(device.type, args.quick, args.batch)
    variants = [(p, c) for c in ([False, True] if args.compile else [False]) for p in args.precision]
    rows, start = [], time.perf_counter()
    for name in args.only or list(cases):
        for precision, compile_ in variants:
            row = measure(cases[name], device, precision, compile_, rounds, warm=2 if compile_ else 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "chunk_seconds"}), flush=True)
    wall = time.perf_counter() - start
    print()
    print(table(rows))
    print(f"\n{len(rows)} rows in {wall:.0f} s on {machine(device)}; goal: overhead <= 5 % "
          f"({'met' if all(r['overhead_pct'] <= 5.0 for r in rows) else 'NOT met'} in every row)")
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "throughput.json"))
    if out:
        Path(out).write_text(json.dumps({"machine": machine(device), "quick": args.quick, "wall_s": wall,
                                         "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
