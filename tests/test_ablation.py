"""benchmarks/ablation.py: every variant is a valid params file for its data set, and the table shows the mean over
several sample sets only where a row has them."""

from __future__ import annotations

import pytest
import yaml

from benchmarks import ablation
from benchmarks.methods import REPO, _merge
from pipeline.config import validate


@pytest.mark.parametrize("data", list(ablation.VARIANTS))
def test_every_variant_is_a_valid_params_file(data):
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"data": {"name": data}})
    for name, overrides in ablation.VARIANTS[data].items():
        cfg = validate(_merge(base, overrides))
        assert cfg.data.name == data, name


def _row(**extra) -> dict:
    return {"variant": "v", "fid": 28.0, "fid_floor": 25.0, "fid_domain": 2.0, "fid_domain_floor": 2.5, "kid": 0.002,
            "train_s": 383.4, "total_s": 600.0, **extra}


def test_table_shows_the_mean_over_sample_sets_where_a_row_has_several():
    one, three = ablation.table([_row()]).splitlines()[2:], ablation.table([_row(fid_mean=27.5, fid_sets=3)])
    assert one == ["| v | 28.00 (1.12×) | – | 2.00 (0.80×) | 0.0020 | 383 | 600 |"]
    assert three.splitlines()[2] == ("| v | 28.00 (1.12×) | 27.50 (1.10×, 3 sets) | 2.00 (0.80×) | 0.0020 | 383 "
                                     "| 600 |")
    assert three.splitlines()[0].count("|") == three.splitlines()[2].count("|")
