"""Every run of the project side by side: MLflow's parent runs and `dvc exp show`'s experiments merged into one table,
runs that differ only in their seeds pooled into seed groups (mean and 95 % confidence interval), and quality against
cost figures. The library behind `python -m stages.compare` (reports/compare.md, reports/compare/).

Sources, public formats only: MlflowClient.search_runs over the store pipeline.tracking writes to (a parent run per
pipeline execution, tagged pipeline_key / git_commit / dvc_exp_name / dvc_baseline_rev, its child runs named after
the stages), and the JSON of `dvc exp show --json` (workspace, baseline commits, their experiments). A DVC experiment
and the MLflow parent tagged dvc_exp_name with its name are one row; DVC's params and metrics win (DVC files are the
record), MLflow adds the resolved sampler and the stage wall times.
"""

from pipeline.compare.frame import (COSTS, FIGURES, LIKELIHOODS, METRICS, NUMERIC, STAGES, SWEEP, CompareError,
                                    canon, filter_runs, flat_params, is_seed_key, runs_frame, seed_groups, t_interval)
from pipeline.compare.render import (groups_table, likelihood_figure, markdown_table, quality_figure, render_markdown,
                                     runs_table, write_report)
from pipeline.compare.sources import (find_dvc, load_base_params, load_dvc, load_mlflow, resolve_rev, run_record,
                                      store_uri)

__all__ = ["COSTS", "FIGURES", "LIKELIHOODS", "METRICS", "NUMERIC", "STAGES", "SWEEP", "CompareError", "canon",
           "filter_runs", "find_dvc", "flat_params", "groups_table", "is_seed_key", "likelihood_figure", "load_base_params",
           "load_dvc", "load_mlflow", "markdown_table", "quality_figure", "render_markdown", "resolve_rev", "run_record",
           "runs_frame", "runs_table", "seed_groups", "store_uri", "t_interval", "write_report"]
