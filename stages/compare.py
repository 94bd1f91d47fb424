"""compare: reports/compare.md and reports/compare/*.png, every run of the project side by side (not a DVC stage).

    python -m stages.compare [--data NAME] [--method NAME] [--rev GITREV] [--experiment NAME] [--out FILE.md]

Reads the MLflow store the stages track into (MLFLOW_TRACKING_URI, else <repo>/mlflow.db) and `dvc exp show --json`;
a bad filter or no runs at all is one line on stderr and exit status 2. The default output is gitignored, so running
it never changes the git tree; docs/compare-example.md is a committed example (--out docs/compare-example.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from pipeline.tracking import resolve_root

# Gitignored (.gitignore): `make compare` never changes the git tree.
DEFAULT_OUT = "reports/compare.md"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m stages.compare",
                                description="Compare every run of the project (MLflow and DVC experiments): "
                                            "a markdown report and its figures in the folder of its name.")
    p.add_argument("--data", help="only runs on this data set (data.name)")
    p.add_argument("--method", help="only runs of this method (method.name)")
    p.add_argument("--rev", help="only runs at this git commit (or DVC baseline): anything `git rev-parse` takes, "
                                 "or a prefix of a run's commit")
    p.add_argument("--experiment", help="only runs of this MLflow experiment (tracking.experiment for DVC rows)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"the markdown to write, relative to the repo root; its figures go to the folder of its name "
                        f"(default: {DEFAULT_OUT}, gitignored)")
    args = p.parse_args(argv)
    if not args.out.endswith(".md"):
        p.error(f"--out names the markdown file, e.g. --out {DEFAULT_OUT} (got {args.out!r})")
    return args


def build(args: argparse.Namespace, root: Path, env: Mapping[str, str]) -> tuple[Path, list[Path], int, int]:
    """Load, merge, filter, write; (markdown path, figures, runs, seed groups). CompareError on bad input."""
    from pipeline import compare

    rev = None
    if args.rev is not None:
        rev = compare.resolve_rev(root, args.rev) or args.rev.strip().lower()
    uri = compare.store_uri(root, env)
    records, mlflow_note = compare.load_mlflow(uri, args.experiment)
    # `dvc exp show` lists HEAD's experiments; another commit's need --rev.
    sha = rev if rev is not None and len(rev) == 40 and rev != compare.resolve_rev(root, "HEAD") else None
    dvc_json, dvc_note = compare.load_dvc(root, sha)
    runs = compare.runs_frame(records, dvc_json, compare.load_base_params(root))
    if runs.empty:
        where = [mlflow_note or f"MLflow store {uri}" + (f" (experiment {args.experiment})" if args.experiment else "")]
        where.append(f"DVC: {dvc_note}" if dvc_note else f"`dvc exp show` in {root}")
        raise compare.CompareError("no runs found; looked in " + "; ".join(where))
    for note, other in ((mlflow_note, "DVC"), (dvc_note, "MLflow")):
        if note:
            print(f"compare: warning: {note}; {other} runs only", file=sys.stderr)
    if rev is not None and not re.fullmatch(r"[0-9a-f]{4,40}", rev):
        raise compare.CompareError(f"unknown rev {args.rev!r}: not a git revision in {root} nor a commit prefix")
    filters = {"data": args.data, "method": args.method, "rev": rev, "experiment": args.experiment}
    runs = compare.filter_runs(runs, data=args.data, method=args.method, rev=rev, experiment=args.experiment)
    if runs.empty:
        used = ", ".join(f"--{k} {v}" for k, v in filters.items() if v is not None)
        raise compare.CompareError(f"no runs match {used}")
    groups = compare.seed_groups(runs)
    out = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    dvc = f"not used: {dvc_note}" if dvc_note else f"`dvc exp show --json{' --rev ' + sha if sha else ''}` in `{root}`"
    store = f"`{uri}`" + (f" (not used: {mlflow_note})" if mlflow_note else "")
    command = " ".join(["python -m stages.compare"] + [f"--{k} {shlex.quote(str(v))}" for k, v in
                                                        (("data", args.data), ("method", args.method),
                                                         ("rev", args.rev), ("experiment", args.experiment))
                                                        if v is not None]
                       + ([f"--out {shlex.quote(args.out)}"] if args.out != DEFAULT_OUT else []))
    md, figures = compare.write_report(out, runs, groups, store=store, dvc=dvc, filters=filters, command=command)
    return md, figures, len(runs), len(groups)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; 0 on success, 2 on bad input (one line on stderr)."""
    args = parse_args(argv)
    root = resolve_root(os.environ, Path.cwd())
    from pipeline.compare import CompareError

    try:
        md, figures, n_runs, n_groups = build(args, root, os.environ)
    except CompareError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    where = f" and {len(figures)} figure(s) under {_shown(md.with_suffix(''))}/" if figures else ""
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    print(f"wrote {_shown(md)} ({plural(n_runs, 'run')}, {plural(n_groups, 'seed group')}){where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
