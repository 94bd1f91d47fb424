"""The project's DDIM and DPM-Solver++(2M) against diffusers' schedulers on the same eps model, its flow Euler
step against FlowMatchEulerDiscreteScheduler on the same velocity, and its multistep consistency sampler against
CMStochasticIterativeScheduler on the same denoiser: the same samples.

DDPM's chain (DiscreteVP(linear_betas(1000))) with the exact score of a 2-D Gaussian mixture as the model,
eps(x, t) = -std(t) score(x, t), wrapped for diffusers as model(sample, timestep) -> eps. Both sides get the same
betas (diffusers' trained_betas), the same x_T and the same times: the project walks [*scheduler.timesteps, -1]
(time t is the chain index, -1 the clean end, the scheduler's "previous timestep < 0" / "final sigma 0").

Precision: the project works in float64 (its float64 betas and alpha_bar); diffusers keeps its betas, alpha_bar
and sigmas in float32 and is run on float32 samples, as it runs natively (DPMSolverMultistepScheduler upcasts the
sample to float32 in every step anyway). So the comparison is at float32 precision: torch.testing.assert_close's
float32 defaults, rtol 1.3e-6 and atol 1e-5, on samples of magnitude up to ~6 (measured: max |diff| ~4e-6). A
second check in each test shows the tolerance has teeth: a different algorithm on the same times (first-order DDIM
in place of DPM-Solver's second-order steps, or DDIM one grid shift off) lands orders of magnitude farther away.

diffusers is a benchmark and test dependency only (requirements.txt): the last tests check that the pipeline and
the stages never import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import partial
from pathlib import Path

import diffusers  # pinned in requirements.txt: a missing diffusers fails here, it does not skip
import pytest
import torch

from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn, exact_velocity_fn
from pipeline.processes import DiscreteVP, EDMProcess, LinearPath, linear_betas
from pipeline.samplers.ddpm import ddim_step
from pipeline.samplers.consistency import consistency_plan
from pipeline.samplers.fast import DPMSolverPP2M, denoised, fast_grid, sigma_of
from pipeline.samplers.ode import ode_step
from pipeline.samplers.walk import walk

# diffusers 0.42.1 builds its sigmas with np.array(tensor ** 0.5), which NumPy 2 flags: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = Path(__file__).resolve().parents[1]
MIX = dict(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, 1.0]], covs=[[2.0, 1.0], [0.5, 3.0]])
DDPM = DiscreteVP(linear_betas(1000))
SCORE = exact_score_fn(GaussianMixture.from_params(**MIX), DDPM)
NFES = (5, 10, 20)
# torch.testing.assert_close's defaults for float32, stated: float32 rounding of diffusers' schedule and arithmetic.
TOL = dict(rtol=1.3e-6, atol=1e-5)
# The same walk with a different algorithm must miss by far more than TOL (the check can fail).
DIFFERENT = 1e-3


class EpsModel:
    """The exact mixture's eps(x, t) = -std(t) score(x, t) as diffusers calls a model: model(sample, timestep) with a
    scalar timestep for the whole batch; the output has the sample's dtype. Counts its calls (the NFE)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        t = torch.full((sample.shape[0],), float(timestep), dtype=torch.float64)
        return (-DDPM.marginal(t)[1][:, None] * SCORE(sample.double(), t)).to(sample.dtype)


def _x_T(n: int = 2000) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _diffusers_walk(scheduler, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """diffusers' sampling loop from x_T (float32): scale_model_input, the model, step; the samples and the NFE."""
    model = EpsModel()
    x = x_T.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x, model.calls


def _ddim(n: int, spacing: str):
    s = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=DDPM.betas.numpy(), prediction_type="epsilon",
                                clip_sample=False, thresholding=False, set_alpha_to_one=True, timestep_spacing=spacing)
    s.set_timesteps(n)
    return s


def _dpm(n: int, spacing: str = "linspace"):
    s = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=DDPM.betas.numpy(),
                                              prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                              solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True,
                                              thresholding=False, timestep_spacing=spacing)
    s.set_timesteps(n)
    return s


def _project_grid(scheduler) -> list[float]:
    return [float(t) for t in scheduler.timesteps.tolist()] + [-1.0]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", NFES)
def test_ddim_matches_diffusers_ddim_scheduler(n, spacing):
    """DDIM (eta 0) over [*timesteps, -1] = DDIMScheduler(set_alpha_to_one=True) at n steps. Its step goes from t to
    t - 1000 // n, alpha_bar 1 once that is negative: with "leading" and "trailing" spacing (and 1000 % n == 0) that is
    the next timestep, then the clean end -1, exactly the grid walked here ("linspace" spacing is not: 999, 888, ...
    step by 111 while the scheduler steps by 100)."""
    scheduler = _ddim(n, spacing)
    ts = scheduler.timesteps.tolist()
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    assert len(ts) == n and all(t - stride == u for t, u in zip(ts, ts[1:])) and ts[-1] - stride < 0
    assert float(scheduler.final_alpha_cumprod) == 1.0  # set_alpha_to_one: the last step lands on clean data
    x_T = _x_T()
    ours = walk(partial(ddim_step, eta=0.0), x_T, _project_grid(scheduler), SCORE, DDPM, None)
    theirs, calls = _diffusers_walk(scheduler, x_T)
    assert ours.nfe == calls == n
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours.x.float(), **TOL)
    # teeth: the same DDIM from x_T with every time one stride later (the walk DDIM's "linspace" convention is off by)
    shifted = [min(t + stride, 999.0) for t in _project_grid(scheduler)[:-1]] + [-1.0]
    off = walk(partial(ddim_step, eta=0.0), x_T, shifted, SCORE, DDPM, None).x
    assert float((off - ours.x).abs().max()) > DIFFERENT


@pytest.mark.parametrize("n", NFES)
def test_dpm_solver_matches_diffusers_multistep_scheduler(n):
    """DPMSolverPP2M (fresh per walk) over [*timesteps, -1] = DPMSolverMultistepScheduler(dpmsolver++, order 2,
    midpoint, final sigma zero, lower_order_final): first step first order, then the two-step midpoint form, and the
    step into the clean end (sigma 0) first order, the data prediction itself, on both sides."""
    scheduler = _dpm(n)
    ts = _project_grid(scheduler)
    # the scheduler's sigmas are the chain's sigma = std / m at its integer timesteps, then 0: the clean end -1
    want = sigma_of(DDPM, torch.tensor(ts, dtype=torch.float64))
    assert float(scheduler.sigmas[-1]) == 0.0 and float(want[-1]) == 0.0
    torch.testing.assert_close(scheduler.sigmas.double(), want, rtol=1e-5, atol=0)
    x_T = _x_T()
    ours = walk(DPMSolverPP2M(), x_T, ts, SCORE, DDPM, None)
    theirs, calls = _diffusers_walk(scheduler, x_T)
    assert ours.nfe == calls == n
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours.x.float(), **TOL)
    # teeth: first-order steps only (DDIM, eta 0) on the same times miss the second-order samples
    first_order = walk(partial(ddim_step, eta=0.0), x_T, ts, SCORE, DDPM, None).x
    assert float((first_order - ours.x).abs().max()) > DIFFERENT


@pytest.mark.parametrize("n", NFES)
def test_the_time_spacing_is_diffusers_trailing_and_samples_alike(n):
    """sample.spacing: time on DDPM's chain is the grid of DPMSolverMultistepScheduler(timestep_spacing="trailing"),
    so dpm_solver with it (what the sample stage walks) gives that scheduler's samples."""
    from pipeline.samplers import plan

    scheduler = _dpm(n, "trailing")
    step, grid, _ = plan("dpm_solver", "score", DDPM, n, {"spacing": "time"})
    assert grid.tolist() == _project_grid(scheduler)
    x_T = _x_T()
    ours = walk(step, x_T, grid, SCORE, DDPM, None)
    theirs, calls = _diffusers_walk(scheduler, x_T)
    assert ours.nfe == calls == n
    torch.testing.assert_close(theirs, ours.x.float(), **TOL)


# --------------------------------------------------------------------------- diffusers stays out of the pipeline


FLOW = LinearPath(0.0)
VELOCITY = exact_velocity_fn(GaussianMixture.from_params(**MIX), FLOW)


class VelocityModel:
    """The exact mixture's rectified-flow velocity as diffusers calls a flow model: model(sample, timestep) with
    timestep = σ · 1000 (FlowMatchEulerDiscreteScheduler's num_train_timesteps), σ this project's t; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        t = torch.full((sample.shape[0],), float(timestep) / 1000.0, dtype=torch.float64)
        return VELOCITY(sample.double(), t).to(sample.dtype)


@pytest.mark.parametrize("n", NFES)
def test_flow_euler_matches_diffusers_flow_match_euler_scheduler(n):
    """The ODE's Euler step on a velocity (field "velocity") over diffusers' own σ grid = FlowMatchEulerDiscreteScheduler
    (shift 1: σ from 1 to 1/1000 in n − 1 equal steps, then 0): x ← x + (σ_next − σ) v(x, σ), the same convention of
    time (σ = 1 noise, 0 data) and velocity (noise − data). The project's own uniform grid (1 → 0) is another walk and
    lands farther away than the tolerance."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(n)
    grid = scheduler.sigmas.double().tolist()
    x_T = _x_T()
    ours = walk(partial(ode_step, method="euler", field="velocity"), x_T, grid, VELOCITY, FLOW, None)
    model, x = VelocityModel(), x_T.float()  # the flow scheduler starts from the noise as it is
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    assert ours.nfe == model.calls == n and x.dtype == torch.float32
    torch.testing.assert_close(x, ours.x.float(), **TOL)
    uniform = walk(partial(ode_step, method="euler", field="velocity"), x_T, FLOW.grid(n), VELOCITY, FLOW, None)
    assert float((uniform.x - ours.x).abs().max()) > DIFFERENT


# EDM's process with ε = σ_min = 1e-6: diffusers' consistency step noises its estimate to sqrt(τ² − ε²) (Song et al.
# 2023, Algorithm 1: f(x, ε) = x is a point at level ε), this project's to τ (its f is the denoiser, the data at
# σ = 0). At EDM's ε = 0.002 the two differ by ε²/(2τ) ≈ 1e-6 · |z| at τ = 2.5, at the float32 tolerance; with ε = 1e-6
# the difference is 1e-12 and the comparison shows the algorithm alone.
CM = EDMProcess(sigma_min=1e-6)
CM_SCORE = exact_score_fn(GaussianMixture.from_params(**MIX), CM)


class ConsistencyModel:
    """The mixture's exact denoiser D(x; σ) as diffusers calls a consistency model: model(scaled, timestep) -> F with
    denoised = c_skip(σ) x + c_out(σ) F (the scheduler's boundary-condition scalings), σ read from the scheduler and
    x = scaled · sqrt(σ² + σ_data²) (its scale_model_input undone); counts calls."""

    def __init__(self, scheduler):
        self.scheduler, self.calls = scheduler, 0

    def __call__(self, scaled: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        sigma = self.scheduler.sigmas[self.scheduler.step_index].double()
        x = scaled.double() * (sigma ** 2 + self.scheduler.config.sigma_data ** 2) ** 0.5
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition(sigma)
        return ((denoised(x, float(sigma), CM_SCORE, CM) - c_skip * x) / c_out).float()


class Float32Noise:
    """A generator (pipeline.rng) that draws float32 normals, as diffusers' randn_tensor does, returned in the asked
    dtype: the project's walk runs in float64 (Tweedie's x + σ² score cancels ~7 digits at σ = 80) on diffusers'
    noise."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape, *, dtype=None, device=None) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).to(dtype=dtype, device=device)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_consistency_sampler_matches_diffusers_cm_stochastic_iterative_scheduler(steps):
    """The consistency sampler's walk (consistency_plan: the first `steps` levels of a (steps + 1)-level ρ = 7
    schedule, then the data) = CMStochasticIterativeScheduler with num_train_timesteps = steps + 1 and `steps`
    inference steps (its Karras sigmas are those levels; its last step lands on σ_min with no noise), the same
    denoiser, x_T and noise (drawn in float32 on both sides, as diffusers draws). Walking `steps` levels that end
    at σ_min instead (fast_grid's own end) is another algorithm and lands farther away than the tolerance."""
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=steps + 1, sigma_min=CM.t_min,
                                                         sigma_max=CM.t_max, clip_denoised=False)
    scheduler.set_timesteps(steps)
    step, grid = consistency_plan(CM, steps, "karras", "score")
    assert torch.allclose(scheduler.sigmas[:steps].double(), grid[:steps].float().double(), rtol=1e-6)
    x_T = _x_T() * CM.t_max
    ours = walk(step, x_T, grid, CM_SCORE, CM, Float32Noise(1))
    model, x, noise = ConsistencyModel(scheduler), x_T.float(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=noise).prev_sample
    assert ours.nfe == model.calls == steps and x.dtype == torch.float32
    torch.testing.assert_close(x, ours.x.float(), **TOL)
    if steps > 1:
        other = walk(step, x_T, fast_grid(CM, steps - 1, "karras")[:-1].tolist() + [0.0], CM_SCORE, CM,
                     Float32Noise(1))
        assert float((other.x - ours.x).abs().max()) > DIFFERENT


def test_the_pipeline_and_the_stages_do_not_import_diffusers_at_run_time():
    code = ("import sys; import pipeline.samplers, pipeline.models, stages.sample, stages.evaluate, stages.train; "
            "bad = sorted(m for m in sys.modules if m == 'diffusers' or m.startswith('diffusers.')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _diffusers_imports(path: Path) -> list[str]:
    """Every import of diffusers in a source file: import / from-import statements, importlib.import_module and
    __import__ calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                  if name == "diffusers" or name.startswith("diffusers.")]
    return found


def test_no_source_of_the_pipeline_or_the_stages_imports_diffusers():
    sources = sorted(p for d in ("pipeline", "stages") for p in (REPO / d).rglob("*.py"))
    assert len(sources) > 20
    found = [hit for p in sources for hit in _diffusers_imports(p)]
    assert not found, found
