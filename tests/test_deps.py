"""dvc.yaml's code dependencies against the stages' imports (tests/deps.py): none missing, none stale, the run's own
family the only family a stage depends on."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import yaml

import families
from deps import FAMILY_DEP, OUTPUT_NEUTRAL, ROOT, closure, covered, declared, needed, report
from stages.common import FAMILY_STAGES, STAGE_BODIES

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


@lru_cache(maxsize=None)
def _found() -> dict:
    """Every stage of every family, computed once, on first use (not at collection, on every worker)."""
    return report(DVC, families.NAMES, FAMILY_STAGES)


def test_every_stage_of_dvc_yaml_is_a_stage_body_and_back():
    assert list(DVC["stages"]) == list(STAGE_BODIES)


@pytest.mark.parametrize("stage", list(STAGE_BODIES))
def test_every_imported_file_is_a_dependency(stage):
    """For every method family: each project file the stage runs (transitively) is among its deps, so that editing
    it re-runs the stage rather than restoring a stale result (run `python tests/deps.py` to see what to add)."""
    missing = _found()[stage]["missing"]
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {', '.join(sorted(missing))}"


@pytest.mark.parametrize("stage", list(STAGE_BODIES))
def test_no_code_dependency_is_stale(stage):
    """A code dep that no family's run of the stage imports re-runs it for nothing (e.g. every bridge file was once a
    dependency of every score model's training)."""
    unused = _found()[stage]["unused"]
    assert not unused, f"{stage}: remove from its deps in dvc.yaml: {', '.join(sorted(unused))}"


def test_a_family_is_a_dependency_only_through_its_own_name():
    """No stage names a family's package outright: families/${method.name} renders to the run's own family, so the
    files of the others are never deps of this run."""
    for stage, spec in DVC["stages"].items():
        deps = spec.get("deps", [])
        named = [d for d in deps if d.startswith("families/") and d not in ("families/__init__.py", "families/base.py")]
        assert named in ([], [FAMILY_DEP]), (stage, named)
        assert (FAMILY_DEP in deps) == (stage in FAMILY_STAGES), stage
    for family in families.NAMES:
        for stage in FAMILY_STAGES:
            for other in families.NAMES:
                if other != family:
                    assert not covered(f"families/{other}/__init__.py", declared(DVC, stage, family))


def test_the_closure_follows_imports_and_skips_type_checking_ones():
    train = {p.relative_to(ROOT).as_posix() for p in closure("stages.train")}
    # the files the stale-cache finding named: the noise of every loss, the params schema
    assert {"pipeline/rng.py", "pipeline/config.py", "stages/common.py", "pipeline/losses.py"} <= train
    # stages/common.py and families/__init__.py import families.base under TYPE_CHECKING only
    common = {p.relative_to(ROOT).as_posix() for p in closure("stages.common")}
    assert "families/__init__.py" in common and "families/base.py" not in common
    config = {p.relative_to(ROOT).as_posix() for p in closure("pipeline.config")}
    assert "families/__init__.py" in config and not any(f.startswith("families/ncsnv2") for f in config)


def test_a_bridge_run_needs_its_package_and_a_score_run_does_not():
    bridge = needed("train", "schrodinger_bridge", FAMILY_STAGES)
    assert {"families/schrodinger_bridge/solvers.py", "families/schrodinger_bridge/stages.py"} <= bridge
    ncsn = needed("train", "ncsnv2", FAMILY_STAGES)
    assert not any(f.startswith("families/schrodinger_bridge") for f in ncsn)
    assert "families/ncsnv2/__init__.py" in ncsn


def test_output_neutral_files_exist_and_write_no_declared_output():
    """The files left out of the deps only record runs or name the error class; none of them writes a path dvc.yaml
    declares as an output."""
    outs = {str(o if isinstance(o, str) else next(iter(o))) for spec in DVC["stages"].values()
            for key in ("outs", "metrics", "plots") for o in spec.get(key, [])}
    for rel in OUTPUT_NEUTRAL:
        text = (ROOT / rel).read_text()
        assert Path(ROOT / rel).is_file()
        assert not any(out in text for out in outs), rel


def test_the_user_data_is_a_dependency_of_prepare():
    assert "${data.path}" in DVC["stages"]["prepare"]["deps"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / params["data"]["path"]).is_dir()  # the default path exists in every clone (DVC needs it)


def test_reflow_and_distillation_keys_reach_the_distill_stage_and_never_train():
    """Changing method.fm.reflow, method.fm.pairs or distill.* re-runs distill and what follows, never the first flow's
    training (the issue's "reflow 1 -> 2 retrains nothing of the first flow"): train lists none of them, distill all."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train, distill = stages["train"]["params"], stages["distill"]["params"]
    for key in ("method.fm.reflow", "method.fm.pairs", "distill"):
        assert key in distill and not any(p == key or key.startswith(p + ".") for p in train if isinstance(p, str))
    assert "method.fm" not in train and {"method.fm.sigma_min", "method.fm.coupling"} <= set(train)
