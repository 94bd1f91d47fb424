"""Contract tier for the registry of method families (families/): what each method.name resolves to, and every
undefined combination refused by params validation with a message that says what works."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import families
from families.base import Family, Plan
from pipeline import config
from pipeline.processes import DiscreteVP, NoiseScaleProcess, OUProcess, SubVPSDE, VESDE, VPSDE, build_process

ROOT = Path(__file__).resolve().parents[1]


def plan(name: str, sde: str = "auto", loss: str = "auto", weighting: str = "sigma2", parameterization: str = "auto",
         t_sampling: str = "uniform", scale_by_sigma: bool = True, sampler: str = "auto",
         likelihood: bool = False) -> Plan:
    """The family's plan for these method.* values (the rest at their defaults)."""
    m = config.MethodParams(name=name, sde=sde, loss=loss, weighting=weighting, parameterization=parameterization,
                            t_sampling=t_sampling)
    return families.get(name).plan(m, scale_by_sigma, sampler, likelihood)


def test_registry_has_one_package_per_name_and_nothing_else():
    """Every name is a package families/<name>/ whose FAMILY says that name, and every package is registered: dvc.yaml
    depends on families/${method.name}, so a family must live under its own name."""
    packages = sorted(p.name for p in (ROOT / "families").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(families.NAMES)
    for name in families.NAMES:
        family = families.get(name)
        assert isinstance(family, Family) and family.name == name and family.paper
        assert importlib.import_module(f"families.{name}").__doc__, name
    with pytest.raises(ValueError, match="allowed: ncsnv2, ncsn"):
        families.get("ddim")


def test_config_takes_its_method_names_from_the_registry():
    for name in families.NAMES:
        assert config.MethodParams(name=name).name == name
    with pytest.raises(config.ConfigError, match="method.name"):
        config.validate({"method": {"name": "flow"}})


@pytest.mark.parametrize("kwargs, want", [
    ({"name": "ncsnv2"}, Plan("noise_scales", "dsm", "score_over_sigma", "annealed_langevin", False, None)),
    ({"name": "ncsn", "scale_by_sigma": False}, Plan("noise_scales", "dsm", "score", "annealed_langevin", False, None)),
    ({"name": "exact_score"}, Plan("noise_scales", None, "score", "annealed_langevin", False, None)),
    ({"name": "exact_score", "sde": "ve"}, Plan("ve", None, "score", "pc", True, "huang")),
    ({"name": "ddpm"}, Plan("discrete_vp", "eps_mse", "eps", "ancestral", False, "discrete")),
    ({"name": "ddpm", "loss": "elbo"}, Plan("discrete_vp", "vlb", "eps", "ancestral", False, "discrete")),
    ({"name": "ddpm", "sampler": "ddim"}, Plan("discrete_vp", "eps_mse", "eps", "ddim", False, "discrete")),
    ({"name": "sde"}, Plan("vp", "dsm", "eps", "pc", True, "huang")),
    ({"name": "sde", "sde": "subvp", "sampler": "ode"}, Plan("subvp", "dsm", "eps", "ode", True, "huang")),
    ({"name": "sde", "loss": "elbo", "t_sampling": "importance"}, Plan("vp", "huang_elbo", "drift", "pc", True, "huang")),
    ({"name": "sde", "sde": "ou", "loss": "ssm", "parameterization": "x0"}, Plan("ou", "ssm", "x0", "pc", True, "huang")),
    ({"name": "sohl_dickstein"}, Plan("discrete_vp", "vlb", "kernel", "ancestral", False, "discrete")),
])
def test_plan_resolves_auto(kwargs, want):
    assert plan(**kwargs) == want


def _cfg(**sections) -> dict:
    return {k: v for k, v in sections.items()}


# Each undefined combination, as a user would type it, and words its message must contain.
REFUSED = [
    ({"method": {"name": "ddpm", "sde": "vp"}}, "use method.name: sde"),
    ({"method": {"name": "ncsnv2", "sde": "ve"}}, "method.name: sde with method.sde: ve"),
    ({"method": {"name": "ncsnv2", "loss": "elbo"}}, "ELBO exists for method.name ddpm, sohl_dickstein and sde"),
    ({"method": {"name": "exact_score", "loss": "dsm"}, "data": {"name": "gmm"}}, "trains nothing"),
    ({"method": {"name": "sohl_dickstein", "loss": "dsm"}}, "ELBO only"),
    ({"method": {"name": "sohl_dickstein", "parameterization": "eps"}}, "auto or kernel"),
    ({"method": {"name": "sde", "parameterization": "kernel"}}, "Sohl-Dickstein's"),
    ({"method": {"name": "ddpm", "parameterization": "drift"}}, "needs an SDE"),
    ({"method": {"name": "ddpm", "weighting": "likelihood"}}, "over a continuous SDE"),
    ({"method": {"name": "sde", "sde": "ve", "t_sampling": "importance"}}, "derived for the VP SDE"),
    ({"method": {"name": "sde", "loss": "eps_mse", "t_sampling": "importance"}}, "loss dsm, ism, ssm or elbo"),
    ({"method": {"name": "ncsnv2", "weighting": "likelihood"}}, "over a continuous SDE"),
    ({"method": {"name": "exact_score", "parameterization": "eps"}, "data": {"name": "gmm"}}, "no network"),
    ({"method": {"name": "sde", "schedule": "cosine"}}, "leave it 'linear'"),
    ({"eval": {"likelihood": True}}, "NCSN's noise scales have neither"),
    ({"method": {"name": "sohl_dickstein"}, "sample": {"sampler": "ddim"}}, "sampled with sample.sampler: ancestral"),
    ({"method": {"name": "sohl_dickstein"}, "sample": {"sampler": "edm_heun"}}, "sampled with sample.sampler: ancestral"),
    ({"sample": {"sampler": "dpm_solver", "s_noise": 0}}, "greater than 0"),
    ({"method": {"name": "sde"}, "sample": {"sampler": "annealed_langevin"}}, "use ancestral, ddim, pc, ode, edm_heun or dpm_solver"),
    ({"method": {"name": "ddpm"}, "sample": {"sampler": "pc"}}, "chain has none"),
    ({"method": {"name": "ddpm"}, "sample": {"sampler": "ode"}}, "chain has none"),
    ({"sample": {"sampler": "ode"}}, "continuous time"),
    ({"sample": {"steps": 10}}, "NCSN's noise scales fix the grid"),
    ({"method": {"name": "sohl_dickstein"}, "sample": {"steps": 10}}, "chain's own steps"),
    ({"method": {"name": "ddpm", "num_steps": 100}, "sample": {"steps": 200}}, "must be <= the chain's"),
    ({"method": {"name": "sde", "num_steps": 100}}, "leave it 'auto'"),
    ({"method": {"name": "exact_score", "sde": "vp"}}, "needs data.name: gmm"),
    ({"method": {"name": "ddpm"}, "eval": {"likelihood": True, "likelihood_n": 20_000}}, "must be <= data.n_test"),
    ({"method": {"name": "sde", "sde": "bm"}}, "'auto', 'vp', 've', 'subvp' or 'ou'"),
    ({"sample": {"eta": 1.5}}, "less than or equal to 1"),
    ({"method": {"num_steps": 1, "name": "ddpm"}}, "integer >= 2"),
]


@pytest.mark.parametrize("raw, words", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_undefined_combination_refused_with_what_works(raw, words):
    with pytest.raises(config.ConfigError) as err:
        config.validate(raw)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("raw", [
    {"method": {"name": name}} for name in families.NAMES if name not in ("exact_score", "schrodinger_bridge")
] + [
    {"method": {"name": "schrodinger_bridge"}, "data": {"target": target}} for target in ("moons", "gaussian")
] + [
    {"method": {"name": "exact_score", "sde": sde}, "data": {"name": "gmm"}, "eval": {"likelihood": True}}
    for sde in ("vp", "ve", "subvp", "ou")
] + [
    {"method": {"name": "ddpm", "num_steps": 100}, "sample": {"sampler": "ddim", "steps": 20, "eta": 0.5}},
    {"method": {"name": "sde", "sde": "subvp", "weighting": "likelihood"}, "sample": {"predictor": "euler_maruyama",
                                                                                     "corrector": "none", "lam": 1.0}},
    {"method": {"name": "ncsnv2"}, "sample": {"sampler": "ddim"}},
    {"method": {"name": "sde", "loss": "elbo", "t_sampling": "importance"}, "eval": {"likelihood": True}},
    {"method": {"name": "sde", "loss": "ssm", "t_sampling": "importance", "weighting": "likelihood"}},
])
def test_defined_combinations_validate(raw):
    config.validate(raw)


def test_build_process_per_kind():
    sigmas = [5.0, 1.0, 0.01]
    assert isinstance(build_process("noise_scales", sigmas=sigmas), NoiseScaleProcess)
    ve = build_process("ve", sigmas=sigmas)
    assert isinstance(ve, VESDE) and (ve.sigma_max, ve.sigma_min) == (5.0, 0.01)
    assert type(build_process("vp", sigmas=sigmas)) is VPSDE
    assert type(build_process("subvp", sigmas=sigmas)) is SubVPSDE
    assert type(build_process("ou", sigmas=sigmas)) is OUProcess
    sohl = families.get("sohl_dickstein")
    chain = build_process("discrete_vp", sigmas=sigmas, num_steps=sohl.chain_length("auto"))
    assert isinstance(chain, DiscreteVP) and chain.num_steps == 40
    ddpm = families.get("ddpm")
    m = config.MethodParams(name="ddpm", num_steps=100, schedule="cosine")
    cosine = ddpm.build_process("discrete_vp", m, sigmas)
    assert cosine.num_steps == 100 and float(cosine.alpha_bars[-1]) < 1e-4
    assert ddpm.chain_length("auto") == 1000 and families.get("sde").chain_length("auto") is None
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        build_process("discrete_vp", sigmas=sigmas, num_steps=10, schedule="quadratic")
    with pytest.raises(ValueError, match="unknown process kind"):
        build_process("edm", sigmas=sigmas)  # EDM's family builds its own


def test_loss_options_and_sampling_steps():
    from pipeline.losses import build_loss

    sde = families.get("sde")
    m = config.MethodParams(name="sde", weighting="likelihood", t_sampling="importance")
    assert sde.loss_options("dsm", m) == {"weighting": "likelihood", "t_sampling": "importance"}
    assert sde.loss_options("huang_elbo", m) == {"t_sampling": "importance"}
    assert sde.loss_options("vlb", m) == {"variance": "beta"}
    assert sde.loss_options("eps_mse", m) == {}
    # every registry loss a plan can name accepts the options it is given
    for kwargs in ({"name": "sde", "loss": "ssm"}, {"name": "sde", "loss": "elbo"}, {"name": "ddpm", "loss": "elbo"},
                   {"name": "ddpm"}, {"name": "sohl_dickstein"}):
        pl, family = plan(**kwargs), families.get(kwargs["name"])
        m = config.MethodParams(name=kwargs["name"], num_steps=20 if family.chain_length("auto") else "auto")
        process = family.build_process(pl.process, m, [5.0, 0.01])
        build_loss(pl.loss, process, pl.parameterization, **family.loss_options(pl.loss, m))
    assert sde.sampling_steps(VPSDE(), "auto", "pc") == 1000 and sde.sampling_steps(VPSDE(), 50, "pc") == 50
    assert sde.sampling_steps(DiscreteVP(torch.full((10,), 0.1)), "auto", "ancestral") is None
    # the few-step samplers take their own default (pipeline.samplers.FAST_DEFAULT_STEPS), on NCSN's scales too
    assert sde.sampling_steps(VPSDE(), "auto", "edm_heun") is None and sde.sampling_steps(VPSDE(), 7, "dpm_solver") == 7
    assert config.validate({"sample": {"sampler": "dpm_solver", "steps": 10}}).sample.steps == 10


def test_family_rules_without_a_config():
    """The rules params validation asks refuse and accept on a family alone."""
    get = families.get
    for call, words in [
        (lambda: get("ncsnv2").check_sample_steps("noise_scales", 10, None, "annealed_langevin"), "fix the grid"),
        (lambda: get("sohl_dickstein").check_sample_steps("discrete_vp", 10, 40, "ancestral"), "chain's own steps"),
        (lambda: get("ddpm").check_sample_steps("discrete_vp", 200, 100, "ancestral"), "must be <= the chain's"),
        (lambda: get("exact_score").check_data("moons"), "needs data.name: gmm"),
        (lambda: get("sohl_dickstein").check_conditional(), "no score to guide"),
        (lambda: get("schrodinger_bridge").check_conditional(), "no class-conditional form"),
        (lambda: get("sohl_dickstein").check_clip_denoised(), "no x0_hat to clip"),
        (lambda: get("sde").check_owned(config.MethodParams(name="sde", num_steps=100)), "leave it 'auto'"),
        (lambda: get("ncsnv2").check_owned(config.MethodParams(schedule="cosine")), "leave it 'linear'"),
        (lambda: get("ddpm").check_owned(config.MethodParams(name="ddpm", sigma_data=0.5)),
         "read by method.name edm only"),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
    get("ddpm").check_sample_steps("discrete_vp", 100, 100, "ancestral")
    get("ncsnv2").check_sample_steps("noise_scales", "auto", None, "annealed_langevin")
    get("exact_score").check_data("gmm")
    get("ddpm").check_conditional()
    get("ddpm").check_owned(config.MethodParams(name="ddpm", num_steps=100, schedule="cosine"))
    for words, raw in [("sample.ode_method: euler or heun", {"method": {"name": "sde"}, "sample": {"task": "edit", "sampler": "ode"}}),
                       ("not pc", {"method": {"name": "sde"}, "sample": {"task": "inpaint",
                                                                       "inpaint": {"method": ["replace", "langevin"]}}})]:
        with pytest.raises(config.ConfigError, match=words):
            config.validate(raw)


def test_noise_defaults_per_family():
    from pipeline.noise import SCALED_KINDS

    assert [families.get(n).noise_defaults for n in ("ncsn", "ncsnv2", "exact_score", "sde")] == [
        "ncsn", "ncsnv2", "exact_score", "ncsnv2"]
    assert [k for k in ("noise_scales", "ve", "vp", "subvp", "ou", "discrete_vp") if k in SCALED_KINDS] == [
        "noise_scales", "ve"]


def test_bridge_params_are_its_own_model():
    """method.sb is validated by the bridge's family alone (its pydantic model), and only for a bridge run."""
    with pytest.raises(config.ConfigError, match="method.sb.solver"):
        config.validate({"method": {"name": "schrodinger_bridge", "sb": {"solver": "sinkhorn"}},
                         "data": {"target": "moons"}})
    bridge = families.get("schrodinger_bridge")
    assert bridge.sb(config.MethodParams(name="schrodinger_bridge")).solver == "ipf"
    assert bridge.sb(config.MethodParams(name="schrodinger_bridge", sb={"solver": "dsbm"})).solver == "dsbm"


# A bad value of each key a family owns, and the words of its refusal (the family's Params model, not the config's).
BAD_OWNED = {"sde": ("bm", "'auto', 'vp', 've', 'subvp' or 'ou'"), "schedule": ("quadratic", "'linear' or 'cosine'"),
             "num_steps": (1, "integer >= 2"), "sigma_data": (0.0, "a number > 0"), "sb": ({"sigma": -1.0}, "greater than 0"),
             "fm": ({"coupling": "sinkhorn"}, "'independent' or 'minibatch_ot'")}


@pytest.mark.parametrize("name", families.NAMES)
def test_every_family_validates_its_own_keys_with_its_own_model(name):
    """Each family's Params model holds exactly the method.* keys it reads, their defaults are MethodParams's, and a
    bad value of each is refused by that model, naming method.<key>; the keys it does not read are refused away
    from their defaults by the config (check_owned), so each key is validated somewhere for every family."""
    family = families.get(name)
    defaults = config.MethodParams()
    own = family.params(None)
    assert set(family.reads) == set(type(own).model_fields) <= set(BAD_OWNED)
    for key in family.reads:
        assert family.params(defaults) == own
        value, words = BAD_OWNED[key]
        with pytest.raises(ValueError, match=f"method.{key}") as err:
            family.params(defaults.model_copy(update={key: value}))
        assert words in str(err.value)
    for key in set(BAD_OWNED) - set(family.reads):
        value = {"sb": {"iterations": 3}, "fm": {"coupling": "minibatch_ot"}}.get(key, BAD_OWNED[key][0])
        raw = {"method": {"name": name, key: value}, "data": {"name": "gmm", "target": "moons"}}
        with pytest.raises(config.ConfigError, match=f"method.{key}"):
            config.validate(raw)


def test_the_docs_describe_every_family():
    """docs/methods.md has a row of its table and a section for every registered name (a new family is documented)."""
    text = (ROOT / "docs" / "methods.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    for name in families.NAMES:
        assert any(f"`{name}`" in h for h in headings), name
        assert any(line.startswith("|") and f"`{name}`" in line for line in text.splitlines()), name


def test_the_docs_table_lists_the_samplers_each_family_accepts():
    """The "other samplers accepted" column of docs/methods.md is what the registry accepts at each family's default
    process (rows that say more than a list, exact_score's, are left to its own section)."""
    import re

    from pipeline.names import SAMPLERS

    rows = {}
    for line in (ROOT / "docs" / "methods.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]) if line.startswith("| `") else None
        if name and len(cells) == 7:
            rows[name.group(1)] = cells[5]
    assert set(rows) == set(families.NAMES)
    for name, cell in rows.items():
        if ";" in cell:
            continue
        if cell.startswith("as "):  # "as `ncsnv2`": that row's list
            cell = rows[re.findall(r"`(\w+)`", cell)[0]]
        listed = set(re.findall(r"`(\w+)`", cell))
        family, p = families.get(name), plan(name)
        accepted = set()
        for sampler in SAMPLERS:
            try:
                family.sampler(p.process, sampler)
            except ValueError:
                continue
            accepted.add(sampler)
        assert listed == accepted - {p.sampler}, (name, listed, accepted)
