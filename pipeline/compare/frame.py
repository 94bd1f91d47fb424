"""The runs table: MLflow parent runs and `dvc exp show` rows merged by experiment name, the changed params,
the filters, and the seed groups with their Student-t intervals (pure functions over plain records)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

import families
from pipeline.report import FLOORED
from pipeline.tracking import PARENT_TAG, finite, flatten, metric_name

LIKELIHOODS = ("nll", "bpd", "elbo_bpd")
# FID over eval.fid_seeds sample sets (pipeline.metrics.fidelity.fid_over_sets).
FID_SETS = ("fid_mean", "fid_min", "fid_std")
# The metrics whose value depends on FID's protocol (eval.fid_n, eval.fid_against): never one column across two.
PROTOCOL_METRICS = ("fid", "kid", "fid_domain", "precision", "recall", "density", "coverage") + FID_SETS
STAGES = ("train", "sample", "evaluate")
# The numeric columns of a run, in table order: each floored metric next to its floor and their ratio.
METRICS = [c for m in FLOORED for c in (m, f"{m}_floor", f"{m}/floor")] + list(FID_SETS) + list(LIKELIHOODS)
COSTS = ["nfe", "train_steps"] + [f"{s}_s" for s in STAGES] + ["total_s"]
NUMERIC = METRICS + COSTS
SWEEP = "dvc exp run --queue -S seed=1,2,3,4,5 && dvc queue start -j 1"
FIGURES = {"quality_nfe": "quality_nfe.png", "quality_time": "quality_time.png", "likelihood": "likelihood_steps.png"}
_DVC_STATUS = {None: "finished", "success": "finished", "failed": "failed", "running": "running"}


class CompareError(Exception):
    """A bad filter or nothing to compare: the CLI prints it on one line and exits 2."""


def method_label(params: Mapping[str, str]) -> str | None:
    """method.name with the SDE it runs on where its family reads method.sde (families.label): sde-vp, sde-ve, ..."""
    name = params.get("method.name")
    return None if name is None else families.label(name, params.get("method.sde", "auto"))


def is_bookkeeping_key(key: str) -> bool:
    """Whether a flattened param only says where a run is logged (`tracking.*`): never a difference between runs."""
    return key.startswith("tracking.")


def is_seed_key(key: str) -> bool:
    """Whether a flattened param is a seed (`seed`, `sample.seed`, `eval.seed`, any `*.seed`)."""
    return key.rsplit(".", 1)[-1] == "seed"


def _num_str(f: float) -> str:
    return str(int(f)) if math.isfinite(f) and f.is_integer() and abs(f) < 1e16 else repr(f)


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return int(v) if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e16 else float(v)
    if isinstance(v, Mapping):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return str(v)


def canon(v: Any) -> str:
    """A param value as one comparable string, from MLflow's strings or YAML's values ('True' == true, 5e3 == 5000)."""
    if isinstance(v, str):
        s = v.strip()
        if s.lower() in ("none", "null", "~"):
            return "null"
        if s.lower() in ("true", "false"):
            return s.lower()
        if s[:1] in ("[", "{"):
            try:
                return json.dumps(_norm(json.loads(s)), sort_keys=True)
            except ValueError:
                return s
        try:
            return _num_str(float(s)) if "_" not in s else s
        except ValueError:
            return s
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _num_str(float(v))
    if isinstance(v, (list, tuple, Mapping)):
        return json.dumps(_norm(v), sort_keys=True)
    return str(v)


def flat_params(params: Mapping | None) -> dict[str, str]:
    """Nested (params.yaml) or flat (MLflow) params -> {dotted key: canon(value)}."""
    return {k: canon(v) for k, v in flatten(params or {}).items()}


def run_record(run: Any, experiment: str | None = None) -> dict:
    """An mlflow Run as a plain dict (run_id, name, experiment, status, start, end, tags, params, metrics)."""
    if isinstance(run, Mapping):
        return dict(run)
    info, data = run.info, run.data
    return {"run_id": info.run_id, "name": info.run_name or data.tags.get("mlflow.runName") or info.run_id,
            "experiment": experiment if experiment is not None else info.experiment_id, "status": info.status,
            "start": info.start_time, "end": info.end_time, "tags": dict(data.tags), "params": dict(data.params),
            "metrics": dict(data.metrics)}


# ------------------------------------------------------------------------------------------------------------ rows

def _mlflow_rows(records: Iterable[Any]) -> list[dict]:
    """One row per parent run, completed from its children (stage times, resolved sampler, missing values)."""
    records = [run_record(r) for r in records]
    children: dict[str, list[dict]] = {}
    for r in records:
        if PARENT_TAG in r["tags"]:
            children.setdefault(r["tags"][PARENT_TAG], []).append(r)
    rows = []
    for p in records:
        if PARENT_TAG in p["tags"]:
            continue
        latest: dict[str, dict] = {}  # stage -> its latest child run (a resumed stage runs again)
        for c in sorted(children.get(p["run_id"], []), key=lambda c: c["start"] or 0):
            latest[c["tags"].get("dvc_stage") or c["name"]] = c
        # Only the report stage logs params to the parent, and then all of them: a complete set.
        complete = bool(p["params"])
        params, metrics = dict(p["params"]), {k: v for k, v in p["metrics"].items() if finite(v) is not None}
        seconds = {}
        for stage, c in latest.items():
            # The report stage logs everything to the parent; before it ran, the stages' own runs have it.
            for k, v in c["params"].items():
                if "." in k or k == "seed":
                    params.setdefault(k, v)
            for k, v in c["metrics"].items():
                metrics.setdefault(metric_name(stage, k), v)
            if c["start"] and c["end"]:
                seconds[stage] = (c["end"] - c["start"]) / 1000.0
        sample, train = latest.get("sample", {}).get("params", {}), latest.get("train", {}).get("params", {})
        commit = p["tags"].get("git_commit")
        rows.append({
            "name": p["tags"].get("dvc_exp_name") or p["name"], "params": params, "metrics": metrics,
            "sampler": sample.get("sampler") or params.get("sample.sampler"), "seconds": seconds,
            "train_steps": metrics.get("train.steps", train.get("resolved.steps")),
            "status": str(p["status"] or "").lower() or None, "commit": commit if commit != "nogit" else None,
            "baseline": p["tags"].get("dvc_baseline_rev"), "experiment": p.get("experiment"),
            "run_id": p["run_id"], "start": (p["start"] or 0) / 1000.0, "exp": p["tags"].get("dvc_exp_name"),
            "source": "mlflow", "complete": complete})
    return rows


def _dvc_data(data: Mapping) -> tuple[dict, dict]:
    """(flat params, flat numeric metrics) of one `dvc exp show --json` entry's `data`."""
    params = {}
    for file, content in (data.get("params") or {}).items():
        flat = flatten((content or {}).get("data") or {})
        params.update(flat if file == "params.yaml" else {f"{file}:{k}": v for k, v in flat.items()})
    metrics = {}
    for file, content in (data.get("metrics") or {}).items():
        stem = Path(file).stem
        for k, v in flatten((content or {}).get("data") or {}).items():
            if finite(v) is not None and not isinstance(v, bool):
                metrics[metric_name(stem, k)] = v
    return params, metrics


def _timestamp(ts: str | None) -> float:
    try:
        return pd.Timestamp(ts).timestamp() if ts else 0.0
    except (ValueError, TypeError):
        return 0.0


def _dvc_row(name: str, data: Mapping, commit: str | None, status: str | None) -> dict:
    params, metrics = _dvc_data(data)
    if status in ("failed", "running"):
        metrics = {}  # dvc exp show fills an unfinished experiment in with its baseline's files
    return {"name": name, "params": params, "metrics": metrics, "sampler": params.get("sample.sampler"),
            "seconds": {}, "train_steps": metrics.get("train.steps"), "status": status, "commit": commit,
            "baseline": commit, "experiment": params.get("tracking.experiment"), "run_id": None,
            "start": _timestamp(data.get("timestamp")), "exp": None, "source": "dvc", "complete": bool(params)}


def _dvc_rows(dvc_json: Sequence[Mapping] | None) -> tuple[list[dict], int]:
    """Rows of the baselines, experiments and (when new) workspace of `dvc exp show --json`; and the queued count."""
    rows, workspace, queued = [], None, 0
    for entry in dvc_json or []:
        data = entry.get("data") or {}
        if entry.get("rev") == "workspace":
            workspace = data
            continue
        rows.append(_dvc_row(entry.get("name") or str(entry.get("rev"))[:7], data, entry.get("rev"),
                             "failed" if entry.get("error") else "finished"))
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            revs = exp.get("revs") or []
            if state == "queued":
                queued += 1
                continue
            if not revs:
                continue
            head = revs[0]  # the experiment's latest commit
            row = _dvc_row(exp.get("name") or head.get("name") or str(head.get("rev"))[:7], head.get("data") or {},
                           entry.get("rev"), _DVC_STATUS.get(state, state))
            row["exp"] = row["name"]
            rows.append(row)
    if workspace is not None:
        head = next((e.get("rev") for e in dvc_json or [] if e.get("rev") != "workspace"), None)
        row = _dvc_row("workspace", workspace, head, "finished")
        if not any(r["params"] == row["params"] and r["metrics"] == row["metrics"] for r in rows):
            rows.append(row)
    return rows, queued


def _merge(m: dict, d: dict) -> dict:
    """The row of an experiment in both sources: DVC's params, metrics and status; MLflow's times, resolved sampler."""
    sampler = m["sampler"] if m["sampler"] not in (None, "auto") else d["sampler"]
    return {**m, "params": {**m["params"], **d["params"]}, "metrics": {**m["metrics"], **d["metrics"]},
            "sampler": sampler, "train_steps": d["train_steps"] if d["train_steps"] is not None else m["train_steps"],
            "status": d["status"], "commit": m["commit"] or d["commit"],
            "baseline": m["baseline"] or d["baseline"], "experiment": m["experiment"] or d["experiment"],
            "start": m["start"] or d["start"], "source": "both", "complete": m["complete"] or d["complete"]}


def _changed(params: Mapping[str, str], base: Mapping[str, str], universe: Sequence[str], complete: bool) -> str:
    """`key=value, ...` of the params that differ from the workspace's, with a note on the ones not logged."""
    if not params:
        return "(no params logged)"
    if not base:
        return ""
    items = _diff(params, base, universe)
    missing = sum(k not in params for k in universe)
    if not complete:
        items.append(f"(partial: {len(universe) - missing}/{len(universe)} params logged)")
    elif missing:
        items.append(f"({missing} newer params not logged)")
    return ", ".join(items)


def _diff(params: Mapping[str, str], base: Mapping[str, str], keys: Iterable[str]) -> list[str]:
    return [f"{k}={_short(params[k])}" for k in keys if k in params and params[k] != base.get(k)]


def _short(v: str, width: int = 40) -> str:
    return v if len(v) <= width else v[: width - 1] + "…"


def fid_protocol(params: Mapping[str, str], metrics: Mapping[str, Any]) -> str | None:
    """`N=2000 vs test`: the sample count and split behind a run's FID, KID, precision, ... (metrics/evaluate.json's
    fid_n, the eval.fid_against it ran with); None for a run without them (points)."""
    if all(finite(metrics.get(k)) is None for k in PROTOCOL_METRICS):
        return None
    n = finite(metrics.get("fid_n"))
    # a run older than eval.fid_against compared against test, the only split there was
    against = params.get("eval.fid_against", "test")
    return f"N={int(n)} vs {against}" if n is not None else f"N unknown vs {against}"


def runs_frame(mlflow_runs: Iterable[Any], dvc_json: Sequence[Mapping] | None,
               base_params: Mapping | None) -> pd.DataFrame:
    """One row per run of MLflow (parent runs) and `dvc exp show --json`, merged by experiment name."""
    # mlflow_runs: mlflow Run objects or run_record dicts; base_params: params.yaml (None: DVC's workspace params).
    # Columns: name, method, data, sampler, changed (params that differ from base_params), each floored metric, its
    # floor and their ratio, likelihoods, nfe, train_steps, seconds per stage, commit, source, status; columns
    # starting with `_` are for seed_groups and filter_runs.
    m_rows, (d_rows, queued) = _mlflow_rows(mlflow_runs), _dvc_rows(dvc_json)
    by_exp: dict[str, list[int]] = {}
    for i, r in enumerate(m_rows):
        if r["exp"]:
            by_exp.setdefault(r["exp"], []).append(i)
    rows, merged = [], set()
    for d in d_rows:
        hits = [i for i in by_exp.get(d["exp"] or "", []) if i not in merged]
        if hits:
            i = max(hits, key=lambda i: m_rows[i]["start"])  # a re-run experiment: its latest execution
            merged.add(i)
            rows.append(_merge(m_rows[i], d))
        else:
            rows.append(d)
    rows += [r for i, r in enumerate(m_rows) if i not in merged]

    if base_params is None:  # no params.yaml: the workspace's params as DVC saw them
        workspace = next((e.get("data") or {} for e in dvc_json or [] if e.get("rev") == "workspace"), None)
        base_params = _dvc_data(workspace)[0] if workspace else None
    base = flat_params(base_params) if base_params else {}
    for r in rows:
        r["params"] = {k: canon(v) for k, v in r["params"].items()}
    universe = [k for k in (sorted(base) if base else sorted({k for r in rows for k in r["params"]}))
                if not is_bookkeeping_key(k)]
    records = []
    for r in rows:
        p, m = r["params"], r["metrics"]
        rec = {"name": r["name"], "method": method_label(p), "data": p.get("data.name"),
               "sampler": r["sampler"], "changed": _changed(p, base, universe, r["complete"]),
               "fid_protocol": fid_protocol(p, m)}
        for name in FLOORED + FID_SETS + LIKELIHOODS:
            rec[name] = finite(m.get(name))
            if name in FLOORED:
                floor = finite(m.get(f"{name}_floor"))
                rec[f"{name}_floor"] = floor
                rec[f"{name}/floor"] = rec[name] / floor if rec[name] is not None and floor else None
        rec["nfe"] = finite(m.get("sample.nfe"))
        rec["train_steps"] = finite(r["train_steps"]) or finite(p.get("train.steps"))
        for stage in STAGES:
            rec[f"{stage}_s"] = r["seconds"].get(stage)
        rec["total_s"] = sum(r["seconds"].values()) if r["seconds"] else None
        rec["commit"] = (r["commit"] or r["baseline"] or "")[:7] or None
        rec["source"] = r["source"]
        rec["status"] = r["status"]
        # Seed groups compare complete param sets only; a param newer than the run counts as params.yaml's value
        # (it did not exist yet, and a new param defaults to the old behaviour).
        known = {k: p.get(k, base.get(k)) for k in universe} if r["complete"] else {}
        rec["_group"] = (json.dumps({k: v for k, v in known.items() if not is_seed_key(k)}, sort_keys=True)
                         if known else None)
        rec["_seeds"] = {k: v for k, v in known.items() if is_seed_key(k)}
        rec["_changed_nonseed"] = ", ".join(_diff(p, base, [k for k in universe if not is_seed_key(k)])) \
            if base else ""
        rec["_commit"], rec["_baseline"] = r["commit"], r["baseline"]
        rec["_experiment"], rec["_run_id"], rec["_start"] = r["experiment"], r["run_id"], r["start"]
        records.append(rec)
    columns = (["name", "method", "data", "sampler", "changed", "fid_protocol"] + NUMERIC
               + ["commit", "source", "status", "_group", "_seeds", "_changed_nonseed", "_commit", "_baseline",
                  "_experiment", "_run_id", "_start"])
    df = pd.DataFrame.from_records(records, columns=columns)
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = df.sort_values(["data", "method", "_start"], na_position="last", kind="stable").reset_index(drop=True)
    df.attrs["queued"] = queued
    return df


# ---------------------------------------------------------------------------------------------------------- filters

def filter_runs(df: pd.DataFrame, data: str | None = None, method: str | None = None, rev: str | None = None,
                experiment: str | None = None) -> pd.DataFrame:
    """The runs matching every filter given; CompareError naming the values that exist for an unknown one."""
    keep = pd.Series(True, index=df.index)
    for column, value, what in (("data", data, "data set"), ("method", method, "method")):
        if value is None:
            continue
        have = sorted(set(df[column].dropna()))
        hit = df[column] == value
        if column == "method":  # `sde` takes sde-vp, sde-ve, ... (method_label)
            hit |= df[column].fillna("").str.split("-").str[0] == value
        if not hit.any():
            raise CompareError(f"unknown {what} {value!r}; the runs have: {', '.join(have) or 'none'}")
        keep &= hit
    if experiment is not None:
        keep &= df["_experiment"] == experiment
    if rev is not None:
        rev = rev.lower()
        hit = (df["_commit"].fillna("").str.startswith(rev) | df["_baseline"].fillna("").str.startswith(rev))
        if not hit.any():
            commits = sorted({c for c in df["commit"].dropna()})
            raise CompareError(f"no run has git commit {rev}; the runs' commits: {', '.join(commits) or 'none'}")
        keep &= hit
    out = df[keep].reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


# ------------------------------------------------------------------------------------------------------ seed groups

def t_interval(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, 95 % CI half-width by Student t, n) of the finite values; the half-width is NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    from scipy import stats

    return float(x.mean()), float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)), n


def _seed_label(seeds: list[dict]) -> str:
    keys = sorted({k for s in seeds for k in s}, key=lambda k: (k != "seed", k))
    varying = [k for k in keys if len({s.get(k) for s in seeds}) > 1]
    if not varying:
        return ", ".join(f"{k}={seeds[0].get(k)}" for k in keys) if seeds else ""
    values = sorted(("/".join(str(s.get(k, "?")) for k in varying) for s in seeds), key=_natural)
    return f"{'/'.join(varying)} = {', '.join(values)}"


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def seed_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Pool the finished runs whose params differ only in seeds: n, and per metric its mean and 95 % CI half-width."""
    # n counts distinct seed settings: runs with the same seeds replay one deterministic computation, so they count
    # once (averaged). Per metric `<m>_mean` and `<m>_ci95` = t(0.975, k-1) s / sqrt(k) over the k settings that have
    # it (NaN for k = 1). Runs whose params are not all known (`_group` None) are left out. Runs of one group but two
    # FID protocols (a param newer than one of them that changed N) are two groups: their FIDs never pool.
    numeric = [c for c in NUMERIC if c in df and df[c].notna().any()]
    records = []
    usable = df["_group"].notna() & (df["status"].fillna("finished") == "finished")
    protocol = df["fid_protocol"].fillna("")
    for (key, _), g in df[usable].groupby([df["_group"][usable], protocol[usable]], sort=False):
        seeds = g["_seeds"].map(lambda s: json.dumps(s, sort_keys=True))
        per_seed = g[numeric].groupby(seeds.values, sort=False).mean()  # NaN-skipping: one value per seed setting
        settings = [json.loads(s) for s in per_seed.index]
        samplers = [s for s in g["sampler"].dropna() if s != "auto"] or list(g["sampler"].dropna())
        rec = {"group": g["_changed_nonseed"].iloc[0] or "as params.yaml", "method": g["method"].iloc[0],
               "data": g["data"].iloc[0], "fid_protocol": g["fid_protocol"].iloc[0],
               "sampler": samplers[0] if samplers else None, "n": len(per_seed),
               "runs": len(g), "seeds": _seed_label(settings), "names": ", ".join(g["name"]), "_group": key}
        for c in numeric:
            rec[f"{c}_mean"], rec[f"{c}_ci95"], _ = t_interval(per_seed[c].tolist())
        records.append(rec)
    columns = (["group", "method", "data", "fid_protocol", "sampler", "n", "runs", "seeds", "names"]
               + [f"{c}_{s}" for c in numeric for s in ("mean", "ci95")] + ["_group"])
    out = pd.DataFrame.from_records(records, columns=columns)
    return out.sort_values(["data", "method", "group"], na_position="last", kind="stable").reset_index(drop=True)


