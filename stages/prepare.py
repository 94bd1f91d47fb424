"""prepare: draw or load the data set and write the train / test / reference splits."""

from __future__ import annotations

from pipeline import io
from pipeline.config import Config
from pipeline.data import prepare_splits
from pipeline.gmm import GaussianMixture
from pipeline.tracking import StageRun
from stages.common import REFERENCE, TEST, TRAIN, main


def prepare(cfg: Config, run: StageRun) -> None:
    d = cfg.data
    mixture = GaussianMixture.from_params(d.gmm.weights, d.gmm.means, d.gmm.covs) if d.name == "gmm" else None
    splits = prepare_splits(d.name, n_train=d.n_train, n_test=d.n_test, n_reference=d.n_reference,
                            seed=cfg.seed, noise=d.noise, gmm=mixture, path=d.path)
    for path, key in ((TRAIN, "train"), (TEST, "test"), (REFERENCE, "reference")):
        io.save_npy(path, splits[key].astype("float32"))
    run.log_params({"seed": cfg.seed, "data": d.model_dump(mode="json")})
    run.log_metrics({"dim": splits["train"].shape[1], "n_train": len(splits["train"])})


if __name__ == "__main__":
    main("prepare", prepare)
