"""The registry of method families: method.name -> its family, one package under families/ each.

A family's package is imported only when a run of that family asks for it (`get`), so a run reads no other
family's files, and dvc.yaml lists `families/${method.name}` as a dependency of the stages that ask: editing one
family re-runs only that family's runs (docs/design.md, "Dependencies"). Adding a method: docs/adding-a-method.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from families.base import Family, Plan

# Every method.name, in the order the docs and the comparison list them; each names its package families/<name>/.
NAMES = ("ncsnv2", "ncsn", "exact_score", "ddpm", "sde", "sohl_dickstein", "edm", "flow_matching",
         "schrodinger_bridge")
# The method.* keys one family or another owns, with their defaults (pipeline.config.MethodParams takes them from
# here): a family reads its own through its pydantic model (Family.Params, families/base.py) and refuses the others
# away from these.
OWNED_KEYS = {"sde": "auto", "schedule": "linear", "num_steps": "auto", "sigma_data": "auto"}
# The method.* sections a family owns, with their owner, whose pydantic model knows their defaults: another family's
# run refuses a section away from them (validation only: it can refuse a run, never change what one writes, so the
# owner's package is no dependency of that run, docs/design.md, "Dependencies").
OWNED_SECTIONS = {"sb": "schrodinger_bridge", "fm": "flow_matching"}


def get(name: str) -> Family:
    """The family of method.name `name`; ValueError naming the allowed names for another."""
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(NAMES)}")
    return importlib.import_module(f"families.{name}").FAMILY


def plan(cfg) -> Plan:
    """The plan of a config (pipeline.config.Config): its family's resolution of method.* and sample.sampler.

    With distill.method other than none the final model is a consistency model distilled from the family's
    (stages/distill.py): it is sampled with the consistency sampler alone and has no likelihood; the family
    says whether its model can be distilled (Family.check_distill). ValueError says what works."""
    from dataclasses import replace

    family, s, distill = get(cfg.method.name), cfg.sample, cfg.distill.method
    if distill == "none":
        return family.plan(cfg.method, cfg.model.scale_by_sigma, s.sampler, cfg.eval.likelihood)
    family.check_distill()
    if cfg.method.conditional:
        raise ValueError(f"distill.method: {distill} distils an unconditional model (the consistency model has no "
                         f"labels to guide); leave method.conditional: false")
    if s.task not in ("generate", "interpolate"):
        raise ValueError(f"sample.task: {s.task} wraps a sampler's step around a score; a consistency model "
                         f"(distill.method: {distill}) draws with sample.task generate or interpolate")
    if s.sampler not in ("auto", "consistency"):
        raise ValueError(f"sample.sampler: {s.sampler} walks the method's own model; distill.method: {distill} makes "
                         f"a consistency model, sampled with sample.sampler: consistency (or auto)")
    if cfg.eval.likelihood:
        raise ValueError(f"eval.likelihood: a consistency model (distill.method: {distill}) maps noise to data in "
                         f"one or a few jumps and has no ODE or ELBO to measure (leave eval.likelihood: false)")
    base = family.plan(cfg.method, cfg.model.scale_by_sigma, "auto", False)
    if distill == "ect" and not base.ode:  # Plan.ode: the process is continuous
        raise ValueError(f"distill.method: ect draws continuous times, and method.name: {cfg.method.name} runs on "
                         f"discrete noise levels (its {base.process} process); use distill.method: cd, which walks "
                         f"the teacher's own levels")
    return replace(base, sampler="consistency", ode=False, elbo=None)


def label(name: str, sde: str = "auto") -> str:
    """method.name as runs are named and compared: a family that reads method.sde adds the SDE it runs on (sde-vp
    for sde's auto, exact_score-ve); a name the registry does not know (an old run's) as it is."""
    from pipeline.names import SDES

    if name not in NAMES:
        return name
    family = get(name)
    kind = family.process_kind(sde) if "sde" in family.reads else None
    return f"{name}-{kind}" if kind in SDES else name
