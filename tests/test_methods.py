"""Contract tier for method resolution: what each method.name resolves to, and every undefined
combination refused by params validation with a message that says what works."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.methods import METHODS, Plan, build_process, num_steps_for, plan
from pipeline.processes import DiscreteVP, NoiseScaleProcess, OUProcess, SubVPSDE, VESDE, VPSDE


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
    {"method": {"name": name}} for name in METHODS if name not in ("exact_score", "schrodinger_bridge")
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
    chain = build_process("discrete_vp", sigmas=sigmas, num_steps=num_steps_for("sohl_dickstein", "auto"))
    assert isinstance(chain, DiscreteVP) and chain.num_steps == 40
    cosine = build_process("discrete_vp", sigmas=sigmas, num_steps=num_steps_for("ddpm", 100), schedule="cosine")
    assert cosine.num_steps == 100 and float(cosine.alpha_bars[-1]) < 1e-4
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        build_process("discrete_vp", sigmas=sigmas, num_steps=10, schedule="quadratic")


def test_loss_options_and_sampling_steps():
    from pipeline.losses import build_loss
    from pipeline.methods import loss_options, sampling_steps

    assert loss_options("dsm", "likelihood", "importance") == {"weighting": "likelihood", "t_sampling": "importance"}
    assert loss_options("huang_elbo", "sigma2", "importance") == {"t_sampling": "importance"}
    assert loss_options("vlb", "sigma2", "uniform") == {"variance": "beta"}
    assert loss_options("eps_mse", "sigma2", "uniform") == {}
    # every registry loss a plan can name accepts the options it is given
    for kwargs in ({"name": "sde", "loss": "ssm"}, {"name": "sde", "loss": "elbo"}, {"name": "ddpm", "loss": "elbo"},
                   {"name": "ddpm"}, {"name": "sohl_dickstein"}):
        pl = plan(**kwargs)
        process = build_process(pl.process, sigmas=[5.0, 0.01], num_steps=num_steps_for(kwargs["name"], 20))
        build_loss(pl.loss, process, pl.parameterization, **loss_options(pl.loss, "sigma2", "uniform"))
    assert sampling_steps(VPSDE(), "auto") == 1000 and sampling_steps(VPSDE(), 50) == 50
    assert sampling_steps(DiscreteVP(torch.full((10,), 0.1)), "auto") is None
    # the few-step samplers take their own default (pipeline.samplers.FAST_DEFAULT_STEPS), on NCSN's scales too
    assert sampling_steps(VPSDE(), "auto", "edm_heun") is None and sampling_steps(VPSDE(), 7, "dpm_solver") == 7
    assert config.validate({"sample": {"sampler": "dpm_solver", "steps": 10}}).sample.steps == 10


def test_method_rules_as_plain_functions():
    """The rules params validation asks (pipeline.config) refuse and accept without a Config."""
    from pipeline import methods

    assert methods.check_chain("ddpm", "auto", "cosine") == 1000
    assert methods.check_chain("sde", "auto", "linear") is None
    for call, words in [
        (lambda: methods.check_chain("sde", 100, "linear"), "leave it 'auto'"),
        (lambda: methods.check_chain("ncsnv2", "auto", "cosine"), "leave it 'linear'"),
        (lambda: methods.check_sample_steps("ncsnv2", "noise_scales", 10, None), "fix the grid"),
        (lambda: methods.check_sample_steps("sohl_dickstein", "discrete_vp", 10, 40), "chain's own steps"),
        (lambda: methods.check_sample_steps("ddpm", "discrete_vp", 200, 100), "must be <= the chain's"),
        (lambda: methods.check_data("exact_score", "moons"), "needs data.name: gmm"),
        (lambda: methods.check_conditional("sohl_dickstein"), "no score to guide"),
        (lambda: methods.check_clip_denoised("sohl_dickstein", True), "no x0_hat to clip"),
        (lambda: methods.check_task_sampler("edit", "ode", "rk45"), "sample.ode_method: euler or heun"),
        (lambda: methods.check_inpaint_methods(["replace", "langevin"], "pc"), "not pc"),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
    methods.check_sample_steps("ddpm", "discrete_vp", 100, 100)
    methods.check_sample_steps("ncsnv2", "noise_scales", "auto", None)
    methods.check_data("exact_score", "gmm")
    methods.check_conditional("ddpm")
    methods.check_clip_denoised("sohl_dickstein", "auto")
    methods.check_task_sampler("generate", "ode", "rk45")
    methods.check_task_sampler("inpaint", "ode", "heun")
    methods.check_inpaint_methods(["langevin"], "annealed_langevin")


def test_noise_scale_rules():
    from pipeline.methods import needs_noise_scales, noise_defaults

    assert [noise_defaults(n) for n in ("ncsn", "ncsnv2", "exact_score", "sde")] == [
        "ncsn", "ncsnv2", "exact_score", "ncsnv2"]
    assert [k for k in ("noise_scales", "ve", "vp", "subvp", "ou", "discrete_vp") if needs_noise_scales(k)] == [
        "noise_scales", "ve"]
