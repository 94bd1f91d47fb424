"""Sample quality against network evaluations (NFE): every sampler of every trained model, and diffusers' schedulers
driving the trained DDPM network; a JSON of rows, a markdown table and a figure.

    python -m benchmarks.nfe [--data swissroll|digits] [--only MODEL ...] [--nfe 5 10 ...] [--out PATH.json]
                             [--quick] [--no-track]

Each model trains once through the stages (noise_scales, train, ema; prepare, and on images the classifier, run
once and are copied to every model, as DVC's cache does) in its own scratch directory with the repo's params.yaml
plus `data.name` and the model's overrides. Then, for every sampler that applies to the model and every target NFE,
sample.steps is the largest number of steps whose walk costs at most the target (found by walking the sampler's
own grid with a dummy score: the walker counts the evaluations, so there is no per-sampler formula to get wrong),
and the sample stage runs with it; the row keeps the NFE the stage measured. Metrics are the evaluate stage's:

- points: the evaluate stage itself (cd with its floor, emd with its floor): the numbers
  `dvc exp run -S data.name=... -S method.name=... -S sample.sampler=... -S sample.steps=...` gives;
- images: only fid_domain and its floor, through the functions the evaluate stage calls for it (the classifier
  stage's network, classifier_features of the first eval.fid_n samples, frechet_distance against the test
  features, the floor the classifier stage recorded), so no Inception network runs on the CPU.

diffusers rows (the ddpm model only): DDIMScheduler, DPMSolverMultistepScheduler (dpmsolver++, order 2),
EulerDiscreteScheduler and HeunDiscreteScheduler with the model's exact betas (trained_betas), prediction_type
epsilon, no clipping or thresholding, their default timestep spacing ("trailing" where the default repeats a
timestep and breaks the solver: DPM-Solver's "linspace" at 1000 steps), driving the trained network as
eps = net(x, timestep) (Euler and Heun at fractional timesteps, after scale_model_input). Same initial noise as the
sample stage (per-sample generators from sample.seed; Euler and Heun times init_noise_sigma); NFE = model calls.
Their samples are stored as the sample stage stores its own and measured by the same code. The flows (flow_matching,
flow_matching-ot, reflow-1) get FlowMatchEulerDiscreteScheduler rows the same way: its default σ grid (shift 1),
the trained velocity network called at its timestep (1000 σ, the network's own conditioning).

Output: rows (model, sampler, source, target_nfe, nfe, steps, cd, cd_floor, emd, emd_floor | fid_domain,
fid_domain_floor, sample_s, ...) in benchmarks/nfe_<data>.json, written after every row (a stopped run keeps
its rows); the table, "best project vs best diffusers" per NFE and the must-hold checks in nfe_<data>.md; the
figure nfe_<data>.png. --quick (NFE 10 and 20, 1,000 training steps and 1,000 samples on points, 300 training
steps on images) checks the script end to end in minutes; --no-track keeps the stages' MLflow runs in the scratch
directory (discarded) instead of the repo's store.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from benchmarks.methods import BENCH_EXPERIMENT, _fmt, _merge, _run_stages, track_in_repo

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NFE = (1, 2, 5, 10, 20, 35, 50, 100, 1000)

# The project's samplers by row name: their sample.* keys (sample.steps is set per NFE).
SAMPLERS: dict[str, dict] = {
    "ancestral": {"sampler": "ancestral"},
    "ddim": {"sampler": "ddim"},
    "pc": {"sampler": "pc"},  # params.yaml: reverse_diffusion predictor, 1 Langevin corrector step
    "ode-euler": {"sampler": "ode", "ode_method": "euler"},
    "ode-heun": {"sampler": "ode", "ode_method": "heun"},
    "edm_heun": {"sampler": "edm_heun"},
    "dpm_solver": {"sampler": "dpm_solver"},
    "dpm_solver-time": {"sampler": "dpm_solver", "spacing": "time"},  # diffusers' uniform-time grid
    "consistency": {"sampler": "consistency"},  # a distilled consistency model's multistep sampler
}
SDE_SAMPLERS = ("ancestral", "ddim", "pc", "ode-heun", "edm_heun", "dpm_solver", "dpm_solver-time")
# name -> (overrides of params.yaml, the samplers that apply)
MODELS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "ddpm": ({"method": {"name": "ddpm"}}, ("ancestral", "ddim", "edm_heun", "dpm_solver", "dpm_solver-time")),
    "sde-vp": ({"method": {"name": "sde", "sde": "vp"}}, SDE_SAMPLERS),
    "sde-subvp": ({"method": {"name": "sde", "sde": "subvp"}}, SDE_SAMPLERS),
    "sde-ve": ({"method": {"name": "sde", "sde": "ve"}}, SDE_SAMPLERS),
    "edm": ({"method": {"name": "edm"}}, ("edm_heun", "dpm_solver", "dpm_solver-time", "ddim", "ancestral")),
    # flows walk their velocity: the ODE's Euler and Heun steps and DPM-Solver++ (on uniform time)
    "flow_matching": ({"method": {"name": "flow_matching"}}, ("ode-euler", "ode-heun", "dpm_solver")),
    "flow_matching-ot": ({"method": {"name": "flow_matching", "fm": {"coupling": "minibatch_ot"}}},
                         ("ode-euler", "ode-heun", "dpm_solver")),
    "reflow-1": ({"method": {"name": "flow_matching", "fm": {"reflow": 1}}}, ("ode-euler", "ode-heun", "dpm_solver")),
    # consistency models distilled (distill.method cd) or tuned (ect) from EDM and from the rectified flow
    "edm-cd": ({"method": {"name": "edm"}, "distill": {"method": "cd"}}, ("consistency",)),
    "flow_matching-cd": ({"method": {"name": "flow_matching"}, "distill": {"method": "cd"}}, ("consistency",)),
    "edm-ect": ({"method": {"name": "edm"}, "distill": {"method": "ect"}}, ("consistency",)),
    "flow_matching-ect": ({"method": {"name": "flow_matching"}, "distill": {"method": "ect"}}, ("consistency",)),
}
DIFFUSERS_MODEL = "ddpm"
DIFFUSERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler")
# diffusers' flow scheduler drives the trained flows (its σ grid: 1 → 1/1000 in equal steps, then 0; shift 1)
FLOW_DIFFUSERS = ("FlowMatchEulerDiscreteScheduler",)
FLOW_MODELS = ("flow_matching", "flow_matching-ot", "reflow-1")
# --quick: a few minutes end to end on the CPU.
QUICK_NFE = (10, 20)
QUICK_TRAIN_STEPS = {"points": 1000, "images": 300}
QUICK_POINTS = 1000
QUICK_CLASSIFIER_STEPS = 200

# The must-hold checks (the issue's): the best project sampler within 10 % of the model's 1000-step ancestral at
# <= 20 NFE (points: cd and emd) or <= 35 NFE (images: fid_domain); EDM's cd at <= 35 NFE.
REFERENCE_SAMPLER, REFERENCE_NFE = "ancestral", 1000
# Targets above this run for the reference sampler alone unless --every-sampler: 1000-step walks of every sampler
# would take hours on the CPU, and at 1000 NFE every sampler has converged to the same model (the ddpm rows at
# 1000 NFE in benchmarks/nfe_swissroll.md).
FEW_STEP_LIMIT = 100
WITHIN = 0.10
POINTS_BUDGET, IMAGES_BUDGET = 20, 35
EDM_CD, EDM_BUDGET = 0.12, 35
# Flows and few-step models (issue 25): flow matching's cd at <= 10 NFE; reflow or a consistency model at 1 NFE; on
# images the best 2-NFE model's fid_domain within 1.5 x EDM's at 35 NFE.
FLOW_CD, FLOW_BUDGET, ONE_STEP_CD = 0.12, 10, 0.15
FEW_STEP_MODELS = ("reflow-1", "edm-cd", "flow_matching-cd")
TWO_NFE_RATIO = 1.5


# --------------------------------------------------------------------------- steps for a target NFE


def nfe_of_steps(sampler_keys: dict, params: dict, steps: int) -> Optional[int]:
    """The network evaluations per sample of the sample stage's walk with `steps` (None: steps not allowed), from
    the trained model's process (outputs/noise_scales.json in the current directory) and the stage's own options:
    the walker counts the calls of a dummy score, so the count is the one sampling will measure."""
    import torch

    from pipeline import config, io
    from pipeline.samplers import plan
    from pipeline.samplers.walk import walk
    from stages.common import NOISE_SCALES, process_of, resolve, sampler_options

    record = io.read_json(NOISE_SCALES)
    process = process_of(record)
    try:  # params validation or the plan refuses steps the sampler cannot take (DDPM's grid: at most N)
        r = resolve(config.validate(_merge(params, {"sample": {**sampler_keys, "steps": steps}})))
        resolved, options = sampler_options(r, process, record)
        kind = "velocity" if r.plan.parameterization == "velocity" else "score"
        step, grid, _ = plan(sampler_keys["sampler"], kind, process, resolved, options)
    except ValueError:  # config.ConfigError included
        return None
    x = torch.ones(1, 2, dtype=torch.float64)
    return walk(step, x, grid, lambda x, t: -x, process, torch.Generator().manual_seed(0)).nfe


# steps_for looks for up to this many steps per target NFE (see there).
SEARCH_STEPS = 4


def steps_for(target: int, nfe_of: Callable[[int], Optional[int]]) -> Optional[tuple[int, int]]:
    """(steps, nfe): the most steps whose NFE is at most `target`, the closest NFE; None if one step costs more.

    Bisection over 1..SEARCH_STEPS x target, then a look a few steps further. Beyond `target` steps only where a step
    costs less than one evaluation: on a discrete chain the few-step schedules (edm_heun, dpm_solver) merge levels
    that fall on the same chain index (DPM-Solver's 1000 log-SNR levels on DDPM's chain are 734 distinct indices).
    Params validation bounds sample.steps by the chain's length there (method.num_steps, 1000), so DPM-Solver on
    DDPM gets 734 NFE at most through the stage, its row marked @734."""
    def fits(s: int) -> Optional[int]:
        n = nfe_of(s)
        return n if n is not None and n <= target else None

    if fits(1) is None:
        return None
    lo, hi = 1, SEARCH_STEPS * target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid) is not None:
            lo = mid
        else:
            hi = mid - 1
    best = (lo, fits(lo))
    for s in range(lo + 1, min(lo + 8, SEARCH_STEPS * target) + 1):
        n = fits(s)
        if n is not None and n > best[1]:
            best = (s, n)
    return best


# --------------------------------------------------------------------------- metrics, as the evaluate stage


def points_metrics() -> tuple[dict, float]:
    """Run the evaluate stage on outputs/samples.npz; its cd, cd_floor, emd, emd_floor and its seconds."""
    from stages.common import EVAL_METRICS

    seconds = _run_stages(["evaluate"])
    metrics = json.loads(Path(EVAL_METRICS).read_text())
    return {k: metrics[k] for k in ("cd", "cd_floor", "emd", "emd_floor")}, seconds["evaluate"]


def domain_metrics(device) -> tuple[dict, float]:
    """fid_domain of outputs/samples.npz and its floor, as the evaluate stage computes them (_image_metrics:
    sample_features' domain features of the first eval.fid_n samples, feature_metrics' frechet_distance against
    the classifier stage's test features) without the Inception features it also computes."""
    from pipeline import io
    from pipeline.metrics.domain import classifier_features, load_classifier
    from pipeline.metrics.fid import frechet_distance
    from stages.common import CLASSIFIER, CLASSIFIER_METRICS, DOMAIN_REFERENCE, SAMPLES

    start = time.perf_counter()
    record = io.read_json(CLASSIFIER_METRICS)
    if not record:
        raise RuntimeError("the classifier stage wrote no classifier (one class, or points): no fid_domain")
    reference = io.load_npz(DOMAIN_REFERENCE)
    gen = io.load_npz(SAMPLES)["x"]
    n = len(reference["test"])  # eval.fid_n resolved, = len(fid_reference["test"]) in the evaluate stage
    if len(gen) < n:
        raise ValueError(f"fid_domain compares {n} images each side but there are only {len(gen)} samples")
    classifier = load_classifier(io.load_torch(CLASSIFIER), device=str(device))
    domain = classifier_features(classifier, gen[:n], device=str(device))
    metrics = {"fid_domain": frechet_distance(domain, reference["test"]),
               "fid_domain_floor": record["fid_domain_floor"]}
    return metrics, time.perf_counter() - start


# --------------------------------------------------------------------------- diffusers on the trained DDPM


def make_scheduler(name: str, betas, steps: int, device=None):
    """A diffusers scheduler on the model's betas with `steps` set: prediction_type epsilon, no clipping or
    thresholding, the default timestep spacing unless it repeats a timestep (then "trailing"); (scheduler,
    spacing). HeunDiscreteScheduler repeats every interior timestep by design (its two evaluations per step)."""
    import diffusers

    if name in FLOW_DIFFUSERS:  # a flow's scheduler: no betas, its own σ grid
        scheduler = getattr(diffusers, name)()
        scheduler.set_timesteps(steps, device=device)
        return scheduler, f"shift {scheduler.config.shift:g}"
    common = {"num_train_timesteps": len(betas), "trained_betas": betas, "prediction_type": "epsilon"}
    extra = {"DDIMScheduler": {"clip_sample": False, "thresholding": False, "set_alpha_to_one": True},
             "DPMSolverMultistepScheduler": {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                             "solver_type": "midpoint", "final_sigmas_type": "zero",
                                             "lower_order_final": True, "thresholding": False},
             "EulerDiscreteScheduler": {},
             "HeunDiscreteScheduler": {"clip_sample": False}}[name]
    cls = getattr(diffusers, name)
    scheduler = cls(**common, **extra)
    spacing = scheduler.config.timestep_spacing
    scheduler.set_timesteps(steps, device=device)
    if len(set(scheduler.timesteps.tolist())) < steps:  # e.g. DPM-Solver's "linspace" at 1000 steps: NaNs
        spacing = "trailing"
        scheduler = cls(**common, **extra, timestep_spacing=spacing)
        scheduler.set_timesteps(steps, device=device)
    return scheduler, spacing


def diffusers_steps(name: str, target: int) -> int:
    """num_inference_steps with at most `target` model calls: HeunDiscreteScheduler calls the model 2 k - 1 times
    (its last step, into sigma 0, is Euler's); the others once per step."""
    return (target + 1) // 2 if name == "HeunDiscreteScheduler" else target


def diffusers_sample(name: str, target: int, params: dict) -> dict:
    """Sample the trained DDPM (models/final.pt, current directory) with diffusers' `name` scheduler at `target`
    NFE, from the sample stage's initial noise; store outputs/samples.npz and metrics/sample.json as the sample
    stage does. The row's sampling part: nfe, steps, spacing, sample_s."""
    import torch

    from pipeline import config, defaults, io, pixels
    from pipeline.models import build_network
    from pipeline.rng import SampleGenerators
    from stages.common import FINAL_MODEL, NOISE_SCALES, SAMPLE_METRICS, SAMPLES, data_record, process_of
    from stages.launch import choose_device

    cfg = config.validate(params)
    info, record = data_record(), io.read_json(NOISE_SCALES)
    process = process_of(record)
    obj = io.load_torch(FINAL_MODEL)
    spec = obj["config"]
    flow = name in FLOW_DIFFUSERS
    if (flow and spec.get("parameterization") != "velocity") or (
            not flow and (spec.get("parameterization") != "eps" or not hasattr(process, "betas"))):
        raise RuntimeError(f"diffusers rows need an eps network on DDPM's chain (a velocity network for "
                           f"{name}), got {spec.get('parameterization')} on {type(process).__name__}")
    device = choose_device(cfg.train.device)
    net = build_network(spec, seed=0)
    net.load_state_dict(obj["state_dict"])
    net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    calls = 0

    # diffusers' interface: the output of the whole batch at `timestep`, which is the network's conditioning itself:
    # DDPM's chain index, or 1000 σ for a flow (σ this project's t; LinearPath.conditioning is 1000 t)
    def model(x: torch.Tensor, timestep) -> torch.Tensor:
        nonlocal calls
        calls += 1
        c = torch.full((x.shape[0],), float(timestep), dtype=x.dtype, device=x.device)
        return net(x, c)

    s = cfg.sample
    n, batch_size = defaults.sample_sizes(s.n, s.batch_size, cfg.eval.fid_n, info)
    shape, scaling = tuple(info["shape"]), record.get("scaling")
    betas = None if flow else process.betas.numpy()
    steps = diffusers_steps(name, target)
    chunks, nfe, spacing = [], 0, None
    start_time = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            scheduler, spacing = make_scheduler(name, betas, steps, device)
            x = process.prior_sample((b, *shape), SampleGenerators(s.seed, range(start, start + b))).to(device)
            x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # the flow scheduler starts from the noise itself
            calls = 0
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                x = scheduler.step(model(inp, t), t, x).prev_sample
            nfe = max(nfe, calls)
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"{name}: non-finite samples at {steps} steps")
            chunks.append((pixels.to_pixels(x, scaling) if scaling else x.float()).cpu().numpy())
    seconds = time.perf_counter() - start_time
    import numpy as np

    io.save_npz(SAMPLES, x=np.concatenate(chunks))
    io.write_json(SAMPLE_METRICS, {"nfe": nfe, "n": n})
    return {"nfe": nfe, "steps": steps, "spacing": spacing, "sample_s": seconds}


# --------------------------------------------------------------------------- one model


def _references(data: str, base: dict, scratch: Path, images: bool) -> Path:
    """prepare (and on images the classifier) once, in scratch/references."""
    ref = scratch / "references"
    ref.mkdir()
    os.chdir(ref)
    Path("params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    os.environ["DVC_EXP_NAME"] = f"bench-nfe-{data}-references"
    seconds = _run_stages(["prepare", "classifier"] if images else ["prepare"])
    print(f"reference stages: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}", flush=True)
    return ref


REFERENCE_FILES = ("data", "models/classifier.pt", "outputs/domain_reference.npz", "metrics/classifier.json")


def _copy_references(src: Path, dst: Path) -> None:
    for rel in REFERENCE_FILES:
        if (src / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / rel).is_dir() else shutil.copyfile)(src / rel, dst / rel)


def _write_params(params: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _targets(sampler: str, nfes: list[int], every: bool) -> list[int]:
    """The NFE targets a sampler runs at: all of them with --every-sampler, else those up to FEW_STEP_LIMIT and, for
    the reference sampler only, the larger ones."""
    return [n for n in nfes if every or n <= FEW_STEP_LIMIT or sampler == REFERENCE_SAMPLER]


def run_model(name: str, base: dict, data: str, nfes: list[int], scratch: Path, references: Path, images: bool,
              emit: Callable[[dict], None], every: bool = False, only: Optional[list[str]] = None) -> None:
    """Train `name` once, then one row per (sampler, NFE), and per (diffusers scheduler, NFE) on ddpm (targets above
    FEW_STEP_LIMIT for the reference sampler alone unless `every`; `only`: these samplers and schedulers alone);
    each row is passed to `emit` as it comes."""
    from pipeline import config

    overrides, samplers = MODELS[name]
    params = _merge(base, overrides)
    try:
        config.validate(params)
    except config.ConfigError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        print(f"\n=== {name}: skipped, its params do not validate here ({first}); "
              f"method.name {overrides['method']['name']!r} is not available in this checkout yet", flush=True)
        return
    work = scratch / name
    work.mkdir()
    _copy_references(references, work)
    os.chdir(work)
    _write_params(params)
    os.environ["DVC_EXP_NAME"] = f"bench-nfe-{data}-{name}"
    print(f"\n=== {name}: training (noise_scales, train, ema, distill)", flush=True)
    seconds = _run_stages(["noise_scales", "train", "ema", "distill"])
    print(f"=== {name}: trained in {sum(seconds.values()):.0f} s", flush=True)
    from stages.common import SAMPLE_METRICS
    from stages.launch import choose_device

    device = choose_device(config.validate(params).train.device)
    measure = (lambda: domain_metrics(device)) if images else points_metrics
    for sampler in (s for s in samplers if not only or s in only):
        keys = SAMPLERS[sampler]
        for target in _targets(sampler, nfes, every):
            row: dict[str, Any] = {"model": name, "sampler": sampler, "source": "project", "target_nfe": target}
            found = steps_for(target, lambda s: nfe_of_steps(keys, params, s))
            if found is None:
                print(f"{name} {sampler}: one step costs more than {target} NFE; no row", flush=True)
                continue
            steps, expected = found
            variant = _merge(params, {"sample": {**keys, "steps": steps}})
            _write_params(variant)
            os.environ["DVC_EXP_NAME"] = f"bench-nfe-{data}-{name}-{sampler}-{target}"
            row["steps"] = steps
            try:
                row["sample_s"] = _run_stages(["sample"])["sample"]
                row["nfe"] = json.loads(Path(SAMPLE_METRICS).read_text())["nfe"]
                if row["nfe"] != expected:
                    print(f"warning: {name} {sampler} steps {steps}: the stage measured {row['nfe']} NFE, the dry "
                          f"walk {expected}", flush=True)
                metrics, row["evaluate_s"] = measure()
                row.update(metrics)
            except Exception as err:  # a diverged sampler (FloatingPointError) or a failed stage: keep going
                row["error"] = f"{type(err).__name__}: {err}"
            emit(row)
    schedulers = DIFFUSERS if name == DIFFUSERS_MODEL else FLOW_DIFFUSERS if name in FLOW_MODELS else ()
    _write_params(params)
    for scheduler in (s for s in schedulers if not only or s in only):
        for target in _targets(scheduler, nfes, every):
            row = {"model": name, "sampler": scheduler, "source": "diffusers", "target_nfe": target}
            os.environ["DVC_EXP_NAME"] = f"bench-nfe-{data}-{name}-diffusers-{scheduler}-{target}"
            try:
                row.update(diffusers_sample(scheduler, target, params))
                metrics, row["evaluate_s"] = measure()
                row.update(metrics)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
            emit(row)


# --------------------------------------------------------------------------- report


def metric_key(images: bool) -> str:
    return "fid_domain" if images else "cd"


def _ok(r: dict, key: str) -> bool:
    return r.get(key) is not None and isinstance(r[key], float) and math.isfinite(r[key])


def _cell(r: Optional[dict], images: bool) -> str:
    if r is None:
        return "–"
    if "error" in r:
        return "failed"
    text = _fmt(r.get("fid_domain"), 2) if images else f"{_fmt(r.get('cd'))}/{_fmt(r.get('emd'))}"
    return text if r.get("nfe") == r["target_nfe"] else f"{text} @{r.get('nfe')}"


def table(rows: list[dict], nfes: list[int], images: bool) -> str:
    """Rows model · sampler (diffusers marked), columns the target NFEs; cells cd/emd (points) or fid_domain (images),
    '@n' where the walk's NFE is below the target; the floor of each model in the last column."""
    what = "fid_domain" if images else "cd/emd"
    head = (f"| model · sampler ({what}) | " + " | ".join(f"NFE {n}" for n in nfes) + " | floor |\n"
            + "|---" * (len(nfes) + 2) + "|\n")
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        k = (r["model"], r["sampler"], r["source"])
        if k not in keys:
            keys.append(k)
    lines = []
    for model, sampler, source in keys:
        mine = {r["target_nfe"]: r for r in rows if (r["model"], r["sampler"], r["source"]) == (model, sampler, source)}
        floor_row = next((r for r in mine.values() if "error" not in r), None)
        floor = ("–" if floor_row is None else _fmt(floor_row.get("fid_domain_floor"), 2) if images
                 else f"{_fmt(floor_row.get('cd_floor'))}/{_fmt(floor_row.get('emd_floor'))}")
        label = f"{model} · {sampler}" + (" (diffusers)" if source == "diffusers" else "")
        lines.append(f"| {label} | " + " | ".join(_cell(mine.get(n), images) for n in nfes) + f" | {floor} |")
    return head + "\n".join(lines)


def best_lines(rows: list[dict], nfes: list[int], images: bool) -> list[str]:
    """Per target NFE on the ddpm model: the best project sampler against the best diffusers scheduler."""
    key = metric_key(images)
    out = []
    for n in nfes:
        pick = {}
        for source in ("project", "diffusers"):
            found = [r for r in rows if r["model"] == DIFFUSERS_MODEL and r["source"] == source
                     and r["target_nfe"] == n and _ok(r, key)]
            pick[source] = min(found, key=lambda r: r[key]) if found else None
        if not any(pick.values()):
            continue
        parts = [f"{source} {r['sampler']} {key} {r[key]:.4f}" + ("" if images else f" emd {r['emd']:.4f}")
                 + f" (nfe {r['nfe']})" if r else f"{source} –" for source, r in pick.items()]
        out.append(f"NFE {n}: best {parts[0]} vs best {parts[1]}")
    return out


def checks(rows: list[dict], images: bool) -> list[str]:
    """The must-hold checks, PASS / FAIL / n/a each with its numbers."""
    out = []
    budget = IMAGES_BUDGET if images else POINTS_BUDGET
    keys = ("fid_domain",) if images else ("cd", "emd")
    for model in dict.fromkeys(r["model"] for r in rows):
        ref = next((r for r in rows if r["model"] == model and r["source"] == "project"
                    and r["sampler"] == REFERENCE_SAMPLER and r["target_nfe"] == REFERENCE_NFE
                    and all(_ok(r, k) for k in keys)), None)
        label = f"{model}: best project sampler at <= {budget} NFE within {WITHIN:.0%} of {REFERENCE_NFE}-step " \
                f"{REFERENCE_SAMPLER} ({' and '.join(keys)})"
        if ref is None:
            out.append(f"n/a  {label}: no {REFERENCE_NFE}-step {REFERENCE_SAMPLER} row")
            continue
        few = [r for r in rows if r["model"] == model and r["source"] == "project" and isinstance(r.get("nfe"), int)
               and r["nfe"] <= budget and all(_ok(r, k) for k in keys)]
        if not few:
            out.append(f"n/a  {label}: no project row at <= {budget} NFE")
            continue
        passing = [r for r in few if all(r[k] <= (1 + WITHIN) * ref[k] for k in keys)]
        best = min(passing or few, key=lambda r: r[keys[0]])
        numbers = ", ".join(f"{k} {best[k]:.4f} vs {ref[k]:.4f} (x{best[k] / ref[k]:.3f})" for k in keys)
        out.append(f"{'PASS' if passing else 'FAIL'} {label}: {best['sampler']} at {best['nfe']} NFE, {numbers}")
    if not images:
        edm = [r for r in rows if r["model"] == "edm" and r["source"] == "project" and _ok(r, "cd")
               and isinstance(r.get("nfe"), int) and r["nfe"] <= EDM_BUDGET]
        label = f"edm: cd <= {EDM_CD} at <= {EDM_BUDGET} NFE"
        if not edm:
            out.append(f"n/a  {label}: no edm rows (not run, or skipped)")
        else:
            best = min(edm, key=lambda r: r["cd"])
            out.append(f"{'PASS' if best['cd'] <= EDM_CD else 'FAIL'} {label}: {best['sampler']} at {best['nfe']} NFE, "
                       f"cd {best['cd']:.4f}")
    return out + _flow_checks(rows, images)


def _best(rows: list[dict], models, key: str, nfe: int, exact: bool = False) -> Optional[dict]:
    """The row of `models` with the lowest `key` at <= nfe (exactly nfe with `exact`), or None."""
    found = [r for r in rows if r["model"] in models and r["source"] == "project" and _ok(r, key)
             and isinstance(r.get("nfe"), int) and (r["nfe"] == nfe if exact else r["nfe"] <= nfe)]
    return min(found, key=lambda r: r[key]) if found else None


def _flow_checks(rows: list[dict], images: bool) -> list[str]:
    """Issue 25's: flow matching at <= FLOW_BUDGET NFE and one-step models on points; two steps against EDM's 35 on
    images."""
    out = []
    if not images:
        for models, nfe, bound, label in ((("flow_matching", "flow_matching-ot"), FLOW_BUDGET, FLOW_CD,
                                           f"flow matching: cd <= {FLOW_CD} at <= {FLOW_BUDGET} NFE"),
                                          (FEW_STEP_MODELS, 1, ONE_STEP_CD,
                                           f"reflow or consistency model: cd <= {ONE_STEP_CD} at 1 NFE")):
            best = _best(rows, models, "cd", nfe, exact=nfe == 1)
            out.append(f"n/a  {label}: no rows" if best is None else
                       f"{'PASS' if best['cd'] <= bound else 'FAIL'} {label}: {best['model']} {best['sampler']} at "
                       f"{best['nfe']} NFE, cd {best['cd']:.4f}")
        return out
    label = f"best 2-NFE model: fid_domain <= {TWO_NFE_RATIO} x edm's at <= {EDM_BUDGET} NFE"
    edm = _best(rows, ("edm",), "fid_domain", EDM_BUDGET)
    two = _best(rows, [m for m in MODELS if m != "edm"], "fid_domain", 2)
    if edm is None or two is None:
        return [f"n/a  {label}: {'no edm row' if edm is None else 'no row at <= 2 NFE'}"]
    ok = two["fid_domain"] <= TWO_NFE_RATIO * edm["fid_domain"]
    return [f"{'PASS' if ok else 'FAIL'} {label}: {two['model']} {two['sampler']} at {two['nfe']} NFE, fid_domain "
            f"{two['fid_domain']:.4f} vs edm {edm['sampler']} at {edm['nfe']} NFE {edm['fid_domain']:.4f} "
            f"(x{two['fid_domain'] / edm['fid_domain']:.3f})"]


def figure(rows: list[dict], images: bool, path: Path, title: str) -> None:
    """One panel per model: the metric against the measured NFE (log-log), a line per sampler, diffusers dashed,
    the model's floor grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    key = metric_key(images)
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return
    cols = min(3, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    tab = plt.get_cmap("tab10")
    colours = {s: tab(i) for i, s in enumerate(SAMPLERS)}  # tab10 0-5; 7 (grey) is the floor's
    # each diffusers scheduler (dashed) in the colour of the project sampler it is closest to
    colours.update({"DDIMScheduler": colours["ddim"], "DPMSolverMultistepScheduler": colours["dpm_solver"],
                    "HeunDiscreteScheduler": colours["edm_heun"], "EulerDiscreteScheduler": tab(6)})
    for ax, model in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == model and _ok(r, key) and isinstance(r.get("nfe"), int)]
        for sampler, source in dict.fromkeys((r["sampler"], r["source"]) for r in mine):
            pts = sorted((r["nfe"], r[key]) for r in mine if (r["sampler"], r["source"]) == (sampler, source))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if source == "diffusers" else "-", marker="o",
                    ms=3, color=colours.get(sampler), label=sampler + (" (diffusers)" if source == "diffusers" else ""))
        floor = next((r[f"{key}_floor"] for r in mine if _ok(r, f"{key}_floor")), None)
        if floor is not None:
            ax.axhline(floor, color="grey", lw=1.5, label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["target_nfe"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.set_ylabel(key)
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], nfes: list[int], images: bool, header: str) -> str:
    parts = [header, "", table(rows, nfes, images), ""]
    best = best_lines(rows, nfes, images)
    if best:
        parts += ["Best project sampler vs best diffusers scheduler on ddpm (by "
                  f"{metric_key(images)}):", ""] + [f"- {line}" for line in best] + [""]
    parts += ["Must-hold checks:", ""] + [f"- {line}" for line in checks(rows, images)] + [""]
    errors = [f"- {r['model']} · {r['sampler']} ({r['source']}) at NFE {r['target_nfe']}: {r['error']}"
              for r in rows if "error" in r]
    if errors:
        parts += ["Failed rows:", ""] + errors + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


_CELLS = ("Cells: cd/emd (the evaluate stage) on points, fid_domain (evaluate's, no Inception) on images; `@n` "
          "where the walk's NFE is below the column's target. diffusers: trained betas, epsilon, no clipping (the "
          "project's ancestral and ddim clip x0_hat on images, sample.clip_denoised auto), default spacing (DDIM "
          "leading, the others linspace; trailing where linspace repeats a timestep). sample_s in the JSON: the "
          "sample stage's wall time (project), the sampling loop's (diffusers).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="swissroll", help="data.name: swissroll (points) or digits (images)")
    parser.add_argument("--only", nargs="*", choices=list(MODELS), help="models to run (default: all)")
    parser.add_argument("--nfe", nargs="*", type=int, help=f"target NFEs (default: {' '.join(map(str, DEFAULT_NFE))}; "
                                                           f"--quick: {' '.join(map(str, QUICK_NFE))})")
    parser.add_argument("--out", default=None, help="the JSON rows (default: benchmarks/nfe_<data>.json); the table "
                                                    "and the figure go next to it (.md, .png)")
    parser.add_argument("--quick", action="store_true",
                        help=f"check the script end to end: NFE {' '.join(map(str, QUICK_NFE))} unless --nfe, "
                             f"train.steps {QUICK_TRAIN_STEPS['points']} (images {QUICK_TRAIN_STEPS['images']}), "
                             f"{QUICK_POINTS} samples on points, eval.classifier_steps {QUICK_CLASSIFIER_STEPS}")
    parser.add_argument("--no-track", action="store_true",
                        help="log the stages' MLflow runs in the scratch directory (discarded), not the repo's store")
    parser.add_argument("--every-sampler", action="store_true",
                        help=f"run every sampler at targets above {FEW_STEP_LIMIT} too (default: the reference "
                             f"{REFERENCE_SAMPLER} alone there)")
    parser.add_argument("--samplers", nargs="*", choices=[*SAMPLERS, *DIFFUSERS, *FLOW_DIFFUSERS],
                        help="only these project samplers and diffusers schedulers (default: every one that applies)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="run nothing: join the rows of these JSON files (e.g. two runs of disjoint --only) and "
                             "write the table and the figure for them next to --out")
    args = parser.parse_args()
    nfes = sorted(set(args.nfe or (QUICK_NFE if args.quick else DEFAULT_NFE)))
    if min(nfes) < 1:
        parser.error("--nfe: targets must be >= 1")
    if args.no_track:
        os.environ["SCORE_PIPELINE_TRACKING"] = "sync"  # as track_in_repo: no detached replayers into scratch
        os.environ.pop("DVC_ROOT", None)  # each stage's store is its working (scratch) directory
    else:
        track_in_repo()
    out = Path(args.out or REPO / "benchmarks" / f"nfe_{args.data}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = _merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                  {"data": {"name": args.data}, "tracking": {"experiment": BENCH_EXPERIMENT}})
    from pipeline import config

    cfg = config.validate(base)  # the data name and the repo's params, before any work
    if cfg.data.kind is None:
        parser.error(f"--data {args.data}: name a point or image set (a file's kind is known only after prepare)")
    images = cfg.data.kind == "images"
    if args.quick:
        base = _merge(base, {"train": {"steps": QUICK_TRAIN_STEPS[cfg.data.kind]}})
        base = _merge(base, {"eval": {"classifier_steps": QUICK_CLASSIFIER_STEPS}} if images else
                      {"sample": {"n": QUICK_POINTS}, "eval": {"n": QUICK_POINTS, "emd_n": QUICK_POINTS}})
        config.validate(base)
    rows: list[dict] = []
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())]
        out.write_text(json.dumps(rows, indent=1) + "\n")
        nfes = sorted({r["target_nfe"] for r in rows})
        header = (f"# Sample quality against NFE: {args.data}\n\n`python -m benchmarks.nfe --data {args.data} --merge "
                  f"{' '.join(Path(p).name for p in args.merge)}`: the rows of those runs. " + _CELLS)
        text = report(rows, nfes, images, header)
        out.with_suffix(".md").write_text(text + "\n")
        figure(rows, images, out.with_suffix(".png"), f"{args.data}: {metric_key(images)} against NFE")
        print(text)
        return

    def emit(row: dict) -> None:
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as it comes: a long run may be stopped
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)

    models = args.only or list(MODELS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-nfe-") as scratch:
        scratch = Path(scratch)
        references = _references(args.data, base, scratch, images)
        try:
            for name in models:
                try:
                    run_model(name, base, args.data, nfes, scratch, references, images, emit, args.every_sampler,
                              args.samplers)
                except Exception as err:  # a model that fails to train: say so, go on with the others
                    print(f"=== {name}: failed: {type(err).__name__}: {err}", flush=True)
        finally:
            os.chdir(REPO)
    header = (f"# Sample quality against NFE: {args.data}{' (--quick)' if args.quick else ''}\n\n"
              f"`python -m benchmarks.nfe --data {args.data}{' --quick' if args.quick else ''}"
              f"{' --only ' + ' '.join(models) if args.only else ''} --nfe {' '.join(map(str, nfes))}`; "
              f"{time.perf_counter() - started:.0f} s. " + _CELLS)
    text = report(rows, nfes, images, header)
    out.with_suffix(".md").write_text(text + "\n")
    figure(rows, images, out.with_suffix(".png"), f"{args.data}: {metric_key(images)} against NFE")
    print("\n" + text)
    print(f"rows: {out}\ntable: {out.with_suffix('.md')}\nfigure: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
