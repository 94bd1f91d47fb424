"""fid_reference: Inception features of the test and reference images, once per data set (cached by DVC).

Writes outputs/fid_reference.npz (the features of the first eval.fid_n test and reference images, and with
eval.fid_against: train of every training image) and metrics/fid_reference.json (the floors against that split and
the FID protocol, fid_against included). Points have no FID: the
stage writes an empty record and returns.
"""

from __future__ import annotations

import numpy as np

from pipeline import defaults, io
from pipeline.config import Config
from pipeline.tracking import StageRun
from stages.common import FID_METRICS, FID_REFERENCE, REFERENCE, TEST, TRAIN, data_record, main

# eval.fid_against as the protocol records it.
AGAINST = {"test": "test split (floor: reference split)",
           "train": "train split, all {n} images (floor: reference split)"}


def fid_reference_stage(cfg: Config, run: StageRun) -> None:
    info = data_record()
    n = defaults.fid_n(cfg.eval.fid_n, info)
    if n is None:
        io.save_npz(FID_REFERENCE, test=np.zeros((0, 2048)), reference=np.zeros((0, 2048)))
        io.write_json(FID_METRICS, {})
        return
    # here, not at the top: a points run returns above without importing torch, torchvision and POT (~5 s)
    from pipeline.metrics.fid import ensure_inception, inception_features, protocol
    from pipeline.metrics.images import reference_metrics
    from stages.launch import choose_device

    device, against = choose_device(cfg.train.device), cfg.eval.fid_against
    weights = ensure_inception()
    images = {"test": np.load(TEST)[:n], "reference": np.load(REFERENCE)[:n]}
    if against == "train":
        images["train"] = np.load(TRAIN)  # every training image: the statistics the papers compare against
    feats = {name: inception_features(x, device=str(device), progress=True) for name, x in images.items()}
    io.save_npz(FID_REFERENCE, **feats)
    metrics = {**reference_metrics(feats[against], feats["reference"], cfg.eval.seed),
               **protocol(n, AGAINST[against].format(n=len(feats[against])), weights), "fid_against": against}
    io.write_json(FID_METRICS, metrics)
    run.log_params({k: v for k, v in metrics.items() if isinstance(v, str)} | {"fid_n": n})
    run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, str)})


if __name__ == "__main__":
    main("fid_reference", fid_reference_stage)
