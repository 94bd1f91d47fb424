"""report: reports/report.md and reports/figures/, and every param and metric on the MLflow parent run."""

from __future__ import annotations

import csv
import shutil

from pipeline import io, plots, report
from pipeline.config import Config, to_dict
from pipeline.tracking import StageRun, flatten
from stages.common import (EVAL_METRICS, EVAL_PLOT, LOSS_CSV, NOISE_PLOT, NOISE_SCALES, REPORT, REPORT_FIGURES,
                           SAMPLE_METRICS, SAMPLES_PLOT, TRAIN_METRICS, main)


def report_stage(cfg: Config, run: StageRun) -> None:
    REPORT_FIGURES.mkdir(parents=True, exist_ok=True)
    with LOSS_CSV.open() as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    figures = []
    if rows:
        plots.loss_curve(REPORT_FIGURES / "loss.png", [s for s, _ in rows], [v for _, v in rows],
                         f"training loss ({cfg.method.name})")
        figures.append(("Training loss", "figures/loss.png"))
    for title, src in (("Noise schedule", NOISE_PLOT), ("Samples against held-out data", SAMPLES_PLOT),
                       ("Densities", EVAL_PLOT)):
        with io.atomic_path(REPORT_FIGURES / src.name) as tmp:
            shutil.copyfile(src, tmp)
        figures.append((title, f"figures/{src.name}"))
    metrics = {"train": io.read_json(TRAIN_METRICS), "sample": io.read_json(SAMPLE_METRICS),
               "evaluate": io.read_json(EVAL_METRICS)}
    noise = io.read_json(NOISE_SCALES)
    params = to_dict(cfg)
    io.write_text(REPORT, report.render(params, metrics, noise, figures))
    flat_metrics = {f"{stage}.{k}": v for stage, m in metrics.items() for k, v in m.items()}
    flat_metrics.update({k: v for k, v in metrics["evaluate"].items()})  # the headline numbers, unprefixed
    flat_metrics.update({f"noise.{k}": noise[k] for k in ("sigma_max", "num_scales", "step_size", "ratio") if k in noise})
    run.log_to_parent(params=flatten(params), metrics=flat_metrics, artifacts=[REPORT])
    run.log_to_parent(artifacts=[REPORT_FIGURES], artifact_path="figures")
    print(report.render_summary(metrics["evaluate"]))


if __name__ == "__main__":
    main("report", report_stage)
