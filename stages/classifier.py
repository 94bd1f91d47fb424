"""classifier: the small CNN behind fid_domain, trained on the train split once per data set (cached by DVC).

Writes models/classifier.pt, outputs/domain_reference.npz (its features of the first eval.fid_n test and reference
images) and metrics/classifier.json (test accuracy, the floors of fid_domain and of precision / recall / density /
coverage on its features, the test split's class histogram). Points, or images with a single class, have no
classifier: an empty record."""

from __future__ import annotations

import numpy as np

from pipeline import defaults, io
from pipeline.config import Config
from pipeline.tracking import StageRun
from stages.common import (CLASSIFIER, CLASSIFIER_METRICS, DOMAIN_REFERENCE, LABELS, REFERENCE, TEST, TRAIN,
                           data_record, main)

# Adam on batches of 128 at lr 1e-3: the classifier is a measuring instrument, not a tuned model.
BATCH_SIZE, LR = 128, 1e-3


def classifier_stage(cfg: Config, run: StageRun) -> None:
    info = data_record()
    n = defaults.fid_n(cfg.eval.fid_n, info)
    if n is None or info["num_classes"] < 2:
        io.save_torch(CLASSIFIER, {"config": {"kind": "none"}, "state_dict": {}})
        io.save_npz(DOMAIN_REFERENCE, test=np.zeros((0, 0)), reference=np.zeros((0, 0)))
        io.write_json(CLASSIFIER_METRICS, {})
        return
    # here, not at the top: a points run returns above without importing torchvision, POT and sklearn (~4 s)
    from pipeline.metrics.domain import (accuracy, class_histogram, classifier_features, classifier_file,
                                         train_classifier)
    from pipeline.metrics.fid import frechet_distance
    from pipeline.metrics.fidelity import prdc_metrics
    from stages.launch import choose_device

    device = str(choose_device(cfg.train.device))
    x, y = np.load(TRAIN), np.load(LABELS["train"])
    model = train_classifier(x, y, info["num_classes"], steps=cfg.eval.classifier_steps, batch_size=BATCH_SIZE,
                             lr=LR, seed=cfg.seed, device=device, progress=True)
    test, test_y = np.load(TEST), np.load(LABELS["test"])
    feats = {"test": classifier_features(model, test[:n], device=device),
             "reference": classifier_features(model, np.load(REFERENCE)[:n], device=device)}
    io.save_torch(CLASSIFIER, classifier_file(model))
    io.save_npz(DOMAIN_REFERENCE, **feats)
    metrics = {"classifier_test_accuracy": accuracy(model, test, test_y, device=device),
               "fid_domain_floor": frechet_distance(feats["reference"], feats["test"]),
               **prdc_metrics(feats["test"], feats["reference"], "_domain_floor"),
               "test_class_histogram": class_histogram(test_y[:n], info["num_classes"]),
               "classifier_steps": cfg.eval.classifier_steps}
    io.write_json(CLASSIFIER_METRICS, metrics)
    run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, list)})


if __name__ == "__main__":
    main("classifier", classifier_stage)
