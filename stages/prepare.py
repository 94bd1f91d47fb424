"""prepare: draw or load the data set and write the train / test / reference splits, their labels and the record;
with data.target (a Schrödinger bridge's other end) the target's splits too, in data/target.npz (empty without)."""

from __future__ import annotations

from pipeline import io
from pipeline.config import Config
from pipeline.data.prepare import prepare_data, prepare_target
from pipeline.tracking import StageRun
from stages.common import DATA_RECORD, LABELS, REFERENCE, TARGET, TEST, TRAIN, main


def prepare(cfg: Config, run: StageRun) -> None:
    d = cfg.data
    uses_gmm = "gmm" in (d.name, d.target)
    mixture = None
    if uses_gmm:  # imported here: the mixture needs torch, two seconds that every other data set's prepare skips
        from pipeline.gmm import GaussianMixture

        mixture = GaussianMixture.from_params(d.gmm.weights, d.gmm.means, d.gmm.covs)
    out = prepare_data(d.name, n_train=d.n_train, n_test=d.n_test, n_reference=d.n_reference, seed=cfg.seed,
                       noise=d.noise, gmm=mixture if d.name == "gmm" else None, path=d.path, labels_path=d.labels_path,
                       download=d.download, image_size=d.image_size, channels=d.channels,
                       upscale=d.upscale)
    for path, key in ((TRAIN, "train"), (TEST, "test"), (REFERENCE, "reference")):
        io.save_npy(path, out.x[key])
        io.save_npy(LABELS[key], out.y[key])
    target: dict = {}
    if d.target is not None:
        target = prepare_target(d.target, dim=int(out.x["train"][0].size), n_train=d.n_train, n_test=d.n_test,
                                n_reference=d.n_reference, seed=cfg.seed, noise=d.noise,
                                gmm=mixture if d.target == "gmm" else None, path=d.target_path, source=out.record)
    io.save_npz(TARGET, **target)
    io.write_json(DATA_RECORD, out.record)
    run.log_params({"seed": cfg.seed, "data": d.model_dump(mode="json")})
    run.log_metrics({"dim": int(out.x["train"][0].size), "n_train": out.record["n_train"],
                     "num_classes": out.record["num_classes"]})


if __name__ == "__main__":
    main("prepare", prepare)
