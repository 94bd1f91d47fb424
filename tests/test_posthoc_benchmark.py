"""benchmarks/posthoc.py: every study is a valid params file, and its table and figure show the decay EMA, the raw
weights and the widths, with the mean FID over several sample sets first where a study has them."""

from __future__ import annotations

import pytest
import yaml

from benchmarks import posthoc
from benchmarks.methods import REPO, _merge
from pipeline.config import validate


@pytest.mark.parametrize("name", list(posthoc.STUDIES))
def test_every_study_is_a_valid_params_file_with_widths_inside_the_reconstructable_range(name):
    overrides, sweep = posthoc.STUDIES[name]
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for sigma_rel in sweep:
        cfg = validate(_merge(_merge(base, overrides), {"ema": {"method": "posthoc", "sigma_rel": sigma_rel}}))
        assert cfg.ema.sigma_rel == sigma_rel
    assert list(sweep) == sorted(set(sweep))


def _rows(sets: bool) -> list[dict]:
    def row(ema, sigma_rel, fid):
        extra = {"fid_mean": fid + 0.5, "fid_sets": 3} if sets else {}
        return {"data": "digits", "ema": ema, "sigma_rel": sigma_rel, "fid": fid, "fid_floor": 25.0, "fid_domain": 2.0,
                "fid_domain_floor": 2.5, "kid": 0.002, "kid_floor": 0.0, "ema_s": 0.1, **extra,
                **({"profile_error": 0.01} if ema == "posthoc" else {})}
    return [row("decay", None, 29.0), row("none", None, 30.0), row("posthoc", 0.05, 28.5), row("posthoc", 0.1, 28.0)]


def test_table_names_each_final_model_and_leads_with_the_mean_over_sets_where_there_are_several():
    plain = posthoc.table(_rows(sets=False)).splitlines()
    assert plain[0] == "| final model | fid | fid_domain | kid | profile error | ema stage s |"
    assert [line.split(" | ")[0] for line in plain[2:]] == ["| decay EMA", "| raw weights", "| post-hoc σ_rel 0.05",
                                                             "| post-hoc σ_rel 0.1"]
    assert plain[3] == "| raw weights | 30.0000 (25.0000) | 2.0000 (2.5000) | 0.0020 (0.0000) | – | 0.1 |"
    sets = posthoc.table(_rows(sets=True)).splitlines()
    assert sets[0].startswith("| final model | fid_mean | fid | ")
    assert sets[2].startswith("| decay EMA | 29.5000 (25.0000) | 29.0000 (25.0000) | ")
    assert all(line.count("|") == sets[0].count("|") for line in sets)


def test_figure_draws_one_panel_per_metric_with_both_baselines(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: seen.update(fig=fig, path=path))
    posthoc.figure(_rows(sets=True), tmp_path / "f.png")
    axes = seen["fig"].axes
    assert [ax.get_title() for ax in axes] == ["fid_mean", "fid", "fid_domain", "kid"]
    labels = axes[0].get_legend_handles_labels()[1]
    assert labels == ["post-hoc EMA", "decay EMA (train.ema_decay)", "raw weights (ema.method none)",
                      "floor (held-out data)", "tracked profiles"]
    assert [line.get_ydata()[0] for line in axes[0].lines[1:4]] == [29.5, 30.5, 25.0]
