"""Inception features per second by batch size: the time per image and whether the bits change with the batch.

    python -m benchmarks.inception [--images 96] [--batches 4 8 16 64] [--rounds 2] [--device cpu]
                                   [--out benchmarks/inception.json]

`pipeline.metrics.fid.inception_features` (clean-fid's "clean" pipeline: PIL bicubic to 299 x 299, the TF
Inception-v3 of 2015-12-05) on random uint8 28 x 28 grey images, each batch size in turn, `--rounds` times after
one warm-up pass; ms an image is the median over rounds. Every batch size's features are compared with the first
one's (`same_bits`). The default batch of `inception_features` on each device, `INCEPTION_BATCH`, was chosen by
this table (docs/images.md, "Cost on the CPU").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_check import _cpu_name
from pipeline.metrics.fid import INCEPTION_BATCH, INCEPTION_BATCH_OTHER, inception_features


def measure(images: np.ndarray, batches: list[int], rounds: int, device: str) -> list[dict]:
    """One row per batch size: median ms an image over rounds, its range, and bit-equality with the first size."""
    inception_features(images[: batches[0]], device=device, batch_size=batches[0])  # load the network, warm up
    times: dict[int, list[float]] = {b: [] for b in batches}
    feats: dict[int, np.ndarray] = {}
    for _ in range(rounds):
        for b in batches:
            start = time.perf_counter()
            feats[b] = inception_features(images, device=device, batch_size=b)
            times[b].append((time.perf_counter() - start) / len(images) * 1000)
    first = feats[batches[0]]
    return [{"batch": b, "ms_per_image": statistics.median(times[b]), "ms_range": [min(times[b]), max(times[b])],
             "same_bits": bool(np.array_equal(feats[b], first))} for b in batches]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/inception.json"))
    a = p.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (a.images, 1, 28, 28), dtype=np.uint8)
    rows = measure(images, a.batches, a.rounds, a.device)
    default = INCEPTION_BATCH.get(torch.device(a.device).type, INCEPTION_BATCH_OTHER)
    print(f"| batch | ms an image (median of {a.rounds}) | range | same bits as batch {a.batches[0]} |")
    print("|---|---|---|---|")
    for r in rows:
        mark = " (default)" if r["batch"] == default else ""
        print(f"| {r['batch']}{mark} | {r['ms_per_image']:.1f} | {r['ms_range'][0]:.1f}–{r['ms_range'][1]:.1f} | "
              f"{'yes' if r['same_bits'] else 'no'} |")
    record = {"machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "device": a.device, "images": a.images, "rounds": a.rounds, "default_batch": default, "rows": rows}
    a.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
