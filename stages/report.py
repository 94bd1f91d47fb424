"""report: reports/report.md and reports/figures/, and every param and metric on the MLflow parent run."""

from __future__ import annotations

import csv
import shutil

from pipeline import io, plots, report
from pipeline.config import Config, to_dict
from pipeline.tracking import StageRun, flatten, metric_name
from stages.common import (CLASSIFIER_METRICS, EVAL_CSV, EVAL_METRICS, EVAL_PLOT, FID_METRICS, LOSS_CSV,
                           NEIGHBOURS_PLOT, NOISE_PLOT, NOISE_SCALES, REPORT, REPORT_FIGURES, SAMPLE_METRICS,
                           SAMPLES_PLOT, TRAIN_METRICS, TRAJECTORY_PLOT, data_record, main)


def _rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# The sample and evaluate figures of sample.task other than generate, with their report titles.
TASK_FIGURES = {
    "inpaint": [("Inpainting side by side: the original, the measurement (grey: generated), each method", SAMPLES_PLOT),
                ("Inpainting trajectory (the first method)", TRAJECTORY_PLOT),
                ("Each inpainting method's metric", EVAL_PLOT)],
    "inverse": [("Inverse problem side by side: the original, its measurement as seen, each method", SAMPLES_PLOT),
                ("Trajectory of the first method", TRAJECTORY_PLOT),
                ("Each method's metric", EVAL_PLOT)],
    "interpolate": [("Interpolation: each row from one sample to another", SAMPLES_PLOT),
                    ("Sampling trajectory of the interpolation", TRAJECTORY_PLOT),
                    ("How evenly the frames move", EVAL_PLOT)],
    "edit": [("SDEdit side by side: the input, then its edit from each t0", SAMPLES_PLOT),
             ("Editing trajectory from the largest t0", TRAJECTORY_PLOT),
             ("Distance from the input (and FID) against t0", EVAL_PLOT)],
}


def report_stage(cfg: Config, run: StageRun) -> None:
    REPORT_FIGURES.mkdir(parents=True, exist_ok=True)
    info = data_record()
    rows = [(int(r["step"]), float(r["loss"])) for r in _rows(LOSS_CSV)]
    figures = []
    if rows:
        plots.loss_curve(REPORT_FIGURES / "loss.png", [s for s, _ in rows], [v for _, v in rows],
                         f"training loss ({cfg.method.name})")
        figures.append(("Training loss", "figures/loss.png"))
    held_out = _rows(EVAL_CSV)
    if held_out:
        plots.loss_curve(REPORT_FIGURES / "held_out.png", [int(r["step"]) for r in held_out],
                         [float(r["value"]) for r in held_out], f"held-out {held_out[0]['unit']} during training")
        figures.append((f"Held-out {held_out[0]['unit']} during training", "figures/held_out.png"))
    shown = [("Noise schedule", NOISE_PLOT), *TASK_FIGURES.get(cfg.sample.task, [
              (report.SAMPLES_TITLE[info["kind"]], SAMPLES_PLOT),
              ("Sampling trajectory", TRAJECTORY_PLOT),
              (report.EVAL_TITLE[info["kind"]], EVAL_PLOT)]),
             ("Nearest training examples of a few outputs (memorisation check)" if cfg.sample.task != "generate"
              else "Nearest training examples of a few samples (memorisation check)", NEIGHBOURS_PLOT)]
    for title, src in shown:
        with io.atomic_path(REPORT_FIGURES / src.name) as tmp:
            shutil.copyfile(src, tmp)
        figures.append((title, f"figures/{src.name}"))
    # the reference stages' records are empty for points, so they add nothing there
    metrics = {"train": io.read_json(TRAIN_METRICS), "sample": io.read_json(SAMPLE_METRICS),
               "evaluate": io.read_json(EVAL_METRICS), "fid_reference": io.read_json(FID_METRICS),
               "classifier": io.read_json(CLASSIFIER_METRICS)}
    noise = io.read_json(NOISE_SCALES)
    params = to_dict(cfg)
    io.write_text(REPORT, report.render(params, metrics, noise, figures, data=info))
    flat_metrics = {metric_name(stage, k): v for stage, m in metrics.items() for k, v in flatten(m).items()}
    flat_metrics.update({f"noise.{k}": noise[k] for k in ("sigma_max", "num_scales", "step_size", "ratio") if k in noise})
    strings = {k: v for k, v in flat_metrics.items() if isinstance(v, str)}
    run.log_to_parent(params={**flatten(params), **strings},
                      metrics={k: v for k, v in flat_metrics.items() if not isinstance(v, str)}, artifacts=[REPORT])
    run.log_to_parent(artifacts=[REPORT_FIGURES], artifact_path="figures")
    print(report.render_summary(metrics["evaluate"]))


if __name__ == "__main__":
    main("report", report_stage)
