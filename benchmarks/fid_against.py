"""FID against the training split, the pipeline's against clean-fid's own: on digits and Fashion-MNIST.

    python -m benchmarks.fid_against [--fashion-train 1000] [--out benchmarks/fid_against.json]

For each data set: `prepare` and `fid_reference` with eval.fid_against: train in a temporary folder (the stages as
`dvc repro` runs them), then `cleanfid.fid.compute_fid` on PNG folders of the same images (the reference split's
first eval.fid_n images, the floor's "samples", against every training image). Both must agree within 1 %
(issue 22); the relative difference is printed and written to the JSON. Fashion-MNIST's train split is cut to
`--fashion-train` images (Inception takes ~0.1 s an image on the 2-core CPU: all 60,000 twice would take hours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def _write_pngs(folder: Path, images: np.ndarray) -> str:
    """uint8 (N, C, H, W) images as PNGs (mode L if C = 1, else RGB)."""
    from PIL import Image

    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
    return str(folder)


def one(name: str, data: dict, fid_n: int, work: Path) -> dict:
    """The pipeline's fid_floor against train and clean-fid's compute_fid on the same images, for one data set."""
    import cleanfid.fid
    import torch

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name=name, **data)
    params["eval"].update(fid_n=fid_n, fid_against="train")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    for stage in ("prepare", "fid_reference"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, check=True)
    pipeline_s = time.perf_counter() - start
    record = json.loads((work / "metrics" / "fid_reference.json").read_text())
    train, reference = np.load(work / "data" / "train.npy"), np.load(work / "data" / "reference.npy")[:fid_n]
    start = time.perf_counter()
    theirs = cleanfid.fid.compute_fid(_write_pngs(work / "reference_png", reference),
                                      _write_pngs(work / "train_png", train), mode="clean",
                                      device=torch.device("cpu"), num_workers=0, use_dataparallel=False,
                                      verbose=False)
    return {"data": name, "n_train": int(len(train)), "fid_n": int(len(reference)),
            "fid_against": record["fid_against"], "pipeline_fid_floor": record["fid_floor"],
            "cleanfid_compute_fid": float(theirs),
            "relative_difference": abs(record["fid_floor"] - theirs) / theirs,
            "pipeline_s": round(pipeline_s, 1), "cleanfid_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-train", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "fid_against.json"))
    args = parser.parse_args(argv)
    sets = [("digits", {}, 300), ("fashion_mnist", {"n_train": args.fashion_train, "n_test": 300,
                                                    "n_reference": 300}, 300)]
    rows = []
    for name, data, fid_n in sets:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one(name, data, fid_n, Path(tmp)))
        print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    worst = max(r["relative_difference"] for r in rows)
    print(f"largest relative difference {worst:.2e} ({'within' if worst <= 0.01 else 'NOT within'} 1 %)")
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
