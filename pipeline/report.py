"""The markdown report: params, metrics next to their floors, the forward process (noise schedule) and figures."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from pipeline.tracking import flatten

# Metrics that have a floor (the same metric between two independent true samples).
FLOORED = ("cd", "emd", "fid", "kid", "fid_domain", "precision", "recall", "density", "coverage", "memorised")
# The titles of the sample and evaluate stages' figures of sample.task generate, by data kind (pipeline.kinds draws
# them: a grid or a scatter over held-out points; a class histogram or the densities side by side).
SAMPLES_TITLE = {"points": "Samples against held-out data", "images": "Samples"}
EVAL_TITLE = {"points": "Densities", "images": "Classes of the samples"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return f"`{json.dumps(v)}`"
    return str(v)


def render(
    params: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]],
    noise: Mapping[str, Any],
    figures: Sequence[tuple[str, str]],
    data: Mapping[str, Any] | None = None,
) -> str:
    """Markdown for reports/report.md; `metrics` maps a stage name to its flat metrics, `data` is the data
    record of the prepare stage (kind, shape, split sizes)."""
    ev = metrics.get("evaluate", {})
    target = params["data"].get("target")  # a Schrödinger bridge's other end
    sets = params["data"]["name"] + (f" -> {target}" if target else "")
    lines = [f"# Report: {params['method']['name']} on {sets}", ""]
    if data is not None and data.get("kind") == "images":
        lines += [f"{data['kind']} of shape {data['shape']}, {data['n_train']} train / {data['n_test']} test / "
                  f"{data['n_reference']} reference; {data.get('source', '')}", ""]
        if "fid_n" in ev:
            lines += [f"FID protocol: {ev.get('fid_impl')}, mode {ev.get('fid_mode')}, N = {ev['fid_n']} samples "
                      f"against the {ev.get('fid_reference')}, {ev.get('fid_weights')}. FID is biased upwards at "
                      f"small N: compare runs at equal N only, next to the floor."
                      + (f" Over {ev['fid_sets']} sample sets of N (eval.fid_seeds): mean {_fmt(ev['fid_mean'])}, "
                         f"min {_fmt(ev['fid_min'])}, standard deviation {_fmt(ev['fid_std'])}; fid below is the "
                         f"first set's." if "fid_sets" in ev else ""), ""]
    lines += ["## Metrics against their floors", "", "| metric | model | floor (true vs true) | model / floor |",
              "|---|---|---|---|"]
    for name in FLOORED:
        if name in ev:
            floor = ev.get(f"{name}_floor")
            ratio = ev[name] / floor if floor else float("nan")
            lines.append(f"| {name} | {_fmt(ev[name])} | {_fmt(floor)} | {ratio:.3g} |")
    others = {f"{stage}.{k}": v for stage, m in metrics.items() for k, v in m.items()
              if not (stage == "evaluate" and (k in FLOORED or k.removesuffix("_floor") in FLOORED))}
    if others:
        lines += ["", "| other metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(others.items())]
    process = noise.get("process", {"kind": "noise_scales"})
    if process["kind"] == "noise_scales":
        lines += ["", "## Noise scales", "", f"L = {noise['num_scales']} scales from sigma_1 = {noise['sigma_max']:.6g} to "
                  f"sigma_L = {noise['sigma_min']:.6g} (ratio {noise['ratio']:.6g}), step size eps = "
                  f"{noise['step_size']:.6g}, T = {noise['steps_per_scale']} Langevin steps per scale.", ""]
        lines += [f"- {key}: {how}" for key, how in sorted(noise["how"].items())]
    else:
        shown = {k: (f"{len(v)} values from {v[0]:.6g} to {v[-1]:.6g}" if isinstance(v, list) else v)
                 for k, v in process.items()}
        lines += ["", "## Forward process", "", ", ".join(f"{k}: {v}" for k, v in shown.items()), ""]
        if "how" in noise:
            lines += [f"- {key}: {how}" for key, how in sorted(noise["how"].items())]
    lines += ["", "## Figures", ""]
    for title, rel in figures:
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Params", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(flatten(params).items())]
    return "\n".join(lines) + "\n"


def render_summary(evaluate: Mapping[str, Any]) -> str:
    """One line with the headline metrics and their floors, for the console."""
    return ", ".join(f"{k} {evaluate[k]:.4f} (floor {evaluate.get(k + '_floor', float('nan')):.4f})"
                     for k in FLOORED if k in evaluate)
