"""What `python -m stages.compare` writes: the quality-against-cost figures and reports/compare.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.compare.frame import (FID_SETS, FIGURES, LIKELIHOODS, NUMERIC, PROTOCOL_METRICS, STAGES, SWEEP,
                                    _natural)
from pipeline.report import FLOORED

# ---------------------------------------------------------------------------------------------------------- figures

def _save(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG atomically, with the same bytes for the same figure (pipeline.plots)."""
    from pipeline import plots

    plots._save(fig, path)


def _styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per method, the same in every figure."""
    markers = "osD^vPX*<>"
    return {m: (f"C{i % 10}", markers[i % len(markers)]) for i, m in enumerate(sorted(set(methods)))}


def _has(g: pd.DataFrame, column: str) -> bool:
    return column in g and bool(g[column].notna().any())


def _scatter_panels(groups: pd.DataFrame, path: Path, x: str, xlabel: str,
                    choose_y: Callable[[pd.DataFrame], Sequence[str]], floors: bool, title: str) -> str | None:
    """Per data set and FID protocol a panel of seed-group means of y (the first of choose_y(panel) present) against
    x, with CI bars."""
    panels, names = [], set()
    protocol = groups["fid_protocol"].fillna("") if "fid_protocol" in groups else pd.Series("", index=groups.index)
    for (data, proto), g in groups.groupby([groups["data"].fillna("?"), protocol], sort=True):
        names.update(choose_y(g))
        if f"{x}_mean" not in g:
            continue
        for y in choose_y(g):
            if f"{y}_mean" in g:
                ok = g[g[f"{y}_mean"].notna() & g[f"{x}_mean"].notna()]
                if len(ok):
                    panels.append((f"{data} ({proto})" if proto and y in PROTOCOL_METRICS else data, y, ok))
                    break
    if not panels:
        return f"no run has {' or '.join(sorted(names)) or 'the metric'} together with {x}"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(groups["method"].fillna("?"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (data, y, g) in zip(axes[0], panels):
        for method, mg in g.groupby(g["method"].fillna("?"), sort=True):
            colour, marker = styles[method]
            xerr = mg[f"{x}_ci95"].fillna(0).to_numpy() if f"{x}_ci95" in mg else None
            ax.errorbar(mg[f"{x}_mean"], mg[f"{y}_mean"], yerr=mg[f"{y}_ci95"].fillna(0).to_numpy(), xerr=xerr,
                        fmt=marker, color=colour, capsize=3, label=method, linestyle="none")
        floor = g.get(f"{y}_floor_mean")
        if floors and floor is not None and floor.notna().any():
            ax.axhline(float(floor.mean()), color="grey", linestyle="--", lw=1, label="floor (true vs true)")
        xs = g[f"{x}_mean"].to_numpy()
        if (xs > 0).all() and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y)
        ax.set_title(f"{data}: {y}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return None


def quality_figure(groups: pd.DataFrame, path: Path, cost: str = "nfe") -> str | None:
    """Plot fid (images) or cd against `cost` (nfe or sample_s) per method; None, or why there was nothing to plot."""
    xlabel = {"nfe": "network evaluations per sample (nfe)", "sample_s": "sample stage wall time (s)"}[cost]
    return _scatter_panels(groups, Path(path), cost, xlabel, lambda g: ("fid", "cd"), True,
                           "quality against cost (seed groups: mean, 95 % CI; dashed: the floor)")


def likelihood_figure(groups: pd.DataFrame, path: Path) -> str | None:
    """Plot bpd (images) or nll against training steps per method; None, or why there was nothing to plot."""
    return _scatter_panels(groups, Path(path), "train_steps", "training steps",
                           lambda g: ("bpd", "nll") if _has(g, "fid_mean") else ("nll", "bpd"), False,
                           "held-out likelihood against training (seed groups: mean, 95 % CI)")


# --------------------------------------------------------------------------------------------------------- markdown

def _cell(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.0f}" if float(v).is_integer() and abs(v) < 1e7 else f"{v:.{digits}g}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub markdown table (DataFrame.to_markdown when tabulate is there)."""
    df = df.fillna("").astype(str).apply(lambda col: col.str.replace("|", "\\|", regex=False))
    try:
        import tabulate  # noqa: F401

        return df.to_markdown(index=False, disable_numparse=True)
    except ImportError:
        head = [str(c).replace("|", "\\|") for c in df.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in df.itertuples(index=False, name=None)]
        return "\n".join(lines)


_SECONDS = {f"{s}_s" for s in STAGES} | {"total_s"}
_LABELS = {"data": "data set", "changed": "changed params", "train_steps": "train steps", "fid_protocol": "FID protocol",
           **{f"{s}_s": f"{s} s" for s in STAGES}, "total_s": "total s"}


def _label(c: str) -> str:
    return _LABELS.get(c, c.replace("_floor", " floor"))


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs as display strings: the columns that some run has, metrics to 4 significant digits, seconds to 0.1."""
    cols = [c for c in ["name", "method", "data", "sampler", "changed", "fid_protocol"] + NUMERIC + ["commit", "source"]
            if c in df and (c in ("name", "changed", "source") or df[c].notna().any())]
    out = pd.DataFrame(index=df.index)
    for c in cols:
        if c in _SECONDS:
            out[_label(c)] = df[c].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
        elif c == "name":
            out[c] = [n if s in (None, "finished") or pd.isna(s) else f"{n} ({s})"
                      for n, s in zip(df["name"], df["status"])]
        else:
            out[_label(c)] = df[c].map(_cell)
    return out


def groups_table(groups: pd.DataFrame) -> pd.DataFrame:
    """The seed groups as display strings: each metric `mean ± CI`, and n `1 (no CI)` for a single seed."""
    head = ["group", "method", "data"] + (["fid_protocol"] if groups["fid_protocol"].notna().any() else [])
    out = groups[head + ["sampler", "n", "seeds"]].copy().rename(columns={c: _label(c) for c in head})
    out["n"] = [f"{n} (no CI)" if n == 1 else str(n) for n in groups["n"]]
    shown = ([c for m in FLOORED for c in (m, f"{m}_floor")] + list(FID_SETS) + list(LIKELIHOODS)
             + ["nfe", "sample_s", "total_s"])
    for c in [c for c in shown if f"{c}_mean" in groups and groups[f"{c}_mean"].notna().any()]:
        cells = []
        for mean, ci, n in zip(groups[f"{c}_mean"], groups[f"{c}_ci95"], groups["n"]):
            seconds = c in _SECONDS
            text = "" if pd.isna(mean) else f"{mean:.1f}" if seconds else _cell(float(mean))
            if not text or c.endswith("_floor") or c == "nfe" or n == 1:
                cells.append(text)
            elif pd.isna(ci):
                cells.append(f"{text} (no CI: 1 value)")
            else:
                cells.append(f"{text} ± {ci:.1f}" if seconds else f"{text} ± {ci:.2g}")
        out[_label(c)] = cells
    return out


def by_protocol(df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """The rows split by FID protocol when they hold more than one (then each part is its own table, so that no
    column holds FIDs of two protocols), runs without FID last; [(None, df)] otherwise."""
    protocols = sorted(df["fid_protocol"].dropna().unique(), key=_natural) if "fid_protocol" in df else []
    if len(protocols) < 2:
        return [(None, df)]
    parts = [(f"FID protocol {p}", df[df["fid_protocol"] == p]) for p in protocols]
    rest = df[df["fid_protocol"].isna()]
    return parts + ([("without FID", rest)] if len(rest) else [])


def _tables(df: pd.DataFrame, table: Callable[[pd.DataFrame], pd.DataFrame], empty: str) -> list[str]:
    """The markdown lines of df as one table, or one per FID protocol under a heading each (by_protocol)."""
    if not len(df):
        return [empty, ""]
    parts = by_protocol(df)
    if len(parts) == 1:
        return [markdown_table(table(df)), ""]
    lines = [f"The runs hold FIDs of {len(parts) - (parts[-1][0] == 'without FID')} protocols (N samples against "
             "a split, `eval.fid_n` and `eval.fid_against`): FID, KID and precision at one protocol do not compare "
             "with another's, so each protocol has its own table.", ""]
    for title, part in parts:
        lines += [f"#### {title}", "", markdown_table(table(part.reset_index(drop=True))), ""]
    return lines


def render_markdown(runs: pd.DataFrame, groups: pd.DataFrame, figures: Sequence[tuple[str, str | None, str | None]],
                    *, store: str, dvc: str, filters: Mapping[str, str | None], command: str) -> str:
    """The text of reports/compare.md: header, runs table, seed-group table, figures, the seed-sweep command."""
    # figures: (title, path relative to the markdown or None, the reason it was skipped).
    by_source = runs["source"].value_counts().to_dict()
    used = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None) or "none"
    lines = ["# Comparison of runs", "",
             f"- MLflow store: {store} (the parent runs of every experiment, unless filtered)",
             f"- DVC: {dvc}",
             f"- Runs: {len(runs)} (" + ", ".join(f"{k} {by_source.get(k, 0)}" for k in ("both", "dvc", "mlflow"))
             + f"); filters: {used}"]
    if runs.attrs.get("queued"):
        lines.append(f"- Queued DVC experiments not shown: {runs.attrs['queued']} (run them: `dvc queue start`)")
    lines += [f"- Made by: `{command}`", "", "## Runs", "",
              "One row per pipeline execution: an MLflow parent run, a `dvc exp show` row, or both merged by "
              "experiment name (source). *changed params*: those that differ from the workspace's params.yaml. "
              "Each metric sits next to its floor (the same metric between two independent true samples) and "
              "their ratio; compare runs at equal sample sizes. Seconds are the wall times of the stage runs in "
              "MLflow: blank where the stage did not run in that execution (DVC reused its outputs) or where only "
              "DVC knows the run; total is the sum of every stage that ran. *FID protocol*: the N samples and the "
              "split FID, KID, precision and the others were computed against (`N=2000 vs test`).", "",
              *_tables(runs, runs_table, "_No runs._"), "## Seed groups", "",
              "Runs whose params are equal except the seeds (`seed`, `sample.seed`, `eval.seed`, any `*.seed`), "
              "pooled. n counts distinct seed settings (runs with the same seeds repeat one deterministic "
              "computation and count once). Each metric: mean ± the 95 % confidence half-width, Student t with "
              "n − 1 degrees of freedom, t(0.975, n−1) · s / √n; a group of one seed has no interval (n "
              "reads `1 (no CI)`). Floors and nfe: means.", ""]
    partial = int(runs["_group"].isna().sum())
    unfinished = int((runs["_group"].notna() & (runs["status"].fillna("finished") != "finished")).sum())
    if partial or unfinished:
        lines += ["Left out: " + "; ".join(
            ([f"{partial} run(s) whose params were only partly logged (the report stage did not run in that "
              "execution), so their group is not known"] if partial else [])
            + ([f"{unfinished} unfinished (failed, running) run(s)"] if unfinished else [])) + ".", ""]
    lines += _tables(groups, groups_table, "_No run has its params logged._")
    lines += ["## Figures", ""]
    for title, rel, why in figures:
        lines += [f"### {title}", "", f"![{title}]({rel})" if rel else f"_Skipped: {why}._", ""]
    lines += ["## A seed sweep", "",
              "A single run says nothing about the spread over seeds. Queue the same params with five more seeds "
              "and run the queue (one at a time; `dvc queue status` follows it, `dvc exp run --run-all -j 1` runs "
              "the queue in the foreground instead):", "", "```", SWEEP, "```", "",
              "then make this report again: the runs form one seed group with n = 6 with the workspace's seed. "
              "`-S sample.seed=...` next to it sweeps the sampling noise as well (every combination is queued).", ""]
    return "\n".join(lines)


def write_report(md: Path, runs: pd.DataFrame, groups: pd.DataFrame, *, store: str, dvc: str,
                 filters: Mapping[str, str | None], command: str) -> tuple[Path, list[Path]]:
    """Write the markdown `md` (e.g. reports/compare.md) and draw its figures into the folder of its name beside it
    (reports/compare/); (the markdown, the figures written)."""
    md = Path(md)
    figdir = md.with_suffix("")
    specs = [("Quality against nfe", FIGURES["quality_nfe"], lambda p: quality_figure(groups, p, "nfe")),
             ("Quality against sampling time", FIGURES["quality_time"],
              lambda p: quality_figure(groups, p, "sample_s")),
             ("Likelihood against training steps", FIGURES["likelihood"], lambda p: likelihood_figure(groups, p))]
    figures, written = [], []
    for title, file, draw in specs:
        path = figdir / file
        why = draw(path)
        if why is None:
            written.append(path)
            figures.append((title, f"{figdir.name}/{file}", None))
        else:
            path.unlink(missing_ok=True)  # a figure of an earlier report would now be wrong
            figures.append((title, None, why))
    io.write_text(md, render_markdown(runs, groups, figures, store=store, dvc=dvc, filters=filters, command=command))
    return md, written
