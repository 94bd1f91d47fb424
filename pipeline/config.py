"""Typed schema of params.yaml: `load(path)` validates everything and returns a frozen Config.

Every stage loads the whole file so that bad input is refused before any work, with a
message naming the key and what is allowed; each stage then reads only its own keys
(the ones dvc.yaml lists for it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import families
from families import NAMES, OWNED_KEYS
from pipeline.defaults import DATA_PATH as DEFAULT_DATA_PATH
from pipeline.defaults import PHOTOS_CROP, PHOTOS_IMAGE_SIZE, POINT_SIZES, SIGMA_REL_MAX, SIGMA_RELS
from pipeline.names import (DATA_SETS, DISTILL_METHODS, EMA_METHODS, GREY_SETS, IMAGE_SETS, INPAINT_METHODS, LABELLED_POINTS, LOSSES,
                            LR_DECAYS, MASKS, OPERATORS, PARAMETERIZATIONS, POINT_SETS, SAMPLERS, TARGETS, TASKS)

Auto = Literal["auto"]
# Keys that moved to another section: named in the error, with where they live now.
MOVED = {"train.ema": "ema.method (decay: train.ema: true; none: train.ema: false; or posthoc)"}


def auto_or_at_least(v: Any, minimum: int) -> Any:
    """A field that takes 'auto' or an integer >= minimum."""
    if v != "auto" and v < minimum:
        raise ValueError(f"must be 'auto' or an integer >= {minimum}")
    return v


class ConfigError(ValueError):
    """params.yaml is invalid; the message names each bad key and what is allowed."""




class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GMMParams(_Section):
    """A Gaussian mixture: K weights, K means of dimension D, K covariances (diagonal list or DxD)."""

    weights: list[float] = Field(default_factory=lambda: [0.4, 0.6])
    means: list[list[float]] = Field(default_factory=lambda: [[2.0, 2.0], [-1.0, 1.0]])
    covs: list[Union[list[float], list[list[float]]]] = Field(default_factory=lambda: [[2.0, 1.0], [0.5, 3.0]])

    @model_validator(mode="after")
    def _valid_mixture(self) -> "GMMParams":
        from pipeline.mixture import mixture_arrays

        try:
            mixture_arrays(self.weights, self.means, self.covs)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"invalid mixture: {err}") from None
        return self


class DataParams(_Section):
    """Which data set, how many examples go to train, test and the reference sample (metric floors), and
    for images how pixels enter the model ('auto' sizes resolve per data set: pipeline/defaults.py)."""

    name: Literal[DATA_SETS] = "swissroll"
    n_train: Union[Auto, int] = "auto"
    n_test: Union[Auto, int] = "auto"
    n_reference: Union[Auto, int] = "auto"
    noise: float = Field(0.0, ge=0.0)
    path: Optional[str] = DEFAULT_DATA_PATH
    labels_path: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = Field(None, ge=2)
    upscale: bool = False
    channels: Union[Auto, Literal[1, 3]] = "auto"
    scaling: Literal["auto", "minus_one_one", "zero_one"] = "auto"
    dequantize: bool = False
    hflip: bool = False
    gmm: GMMParams = Field(default_factory=GMMParams)
    target: Optional[Literal[TARGETS]] = None
    target_path: Optional[str] = None

    @field_validator("labels_path", "target_path")
    @classmethod
    def _default_folder_is_none(cls, v):
        # params.yaml spells "no file" as the empty data folder: every path key is a DVC dependency of prepare,
        # and DVC needs one that exists
        return None if v is not None and Path(v) == Path(DEFAULT_DATA_PATH) else v

    @field_validator("n_train")
    @classmethod
    def _two_train(cls, v):
        return auto_or_at_least(v, 2)

    @field_validator("n_test", "n_reference")
    @classmethod
    def _one_held_out(cls, v):
        return auto_or_at_least(v, 1)

    @property
    def kind(self) -> Optional[str]:
        """'points' or 'images' from the name alone; None for data.name: file (the file decides)."""
        return "points" if self.name in POINT_SETS else "images" if self.name in IMAGE_SETS else None


class NoiseParams(_Section):
    """Noise scales; 'auto' applies NCSNv2 techniques 1, 2, 4 (ncsnv2) or the NCSN hand-set values (ncsn)."""

    sigma_max: Union[Auto, float] = "auto"
    sigma_min: float = Field(0.01, gt=0.0)
    num_scales: Union[Auto, int] = "auto"
    fallback_num_scales: int = Field(50, ge=2)
    steps_per_scale: Union[Auto, int] = "auto"
    step_size: Union[Auto, float] = "auto"
    max_exact_pairwise: int = Field(100_000, ge=2)

    @field_validator("sigma_max", "step_size")
    @classmethod
    def _positive_float(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v

    @field_validator("num_scales")
    @classmethod
    def _at_least_two(cls, v):
        return auto_or_at_least(v, 2)

    @field_validator("steps_per_scale")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)


class ModelParams(_Section):
    """The network: the MLP for points, the U-Net for images (`arch: auto`); `scale_by_sigma` is NCSNv2
    technique 3, s(x, sigma) = s(x) / sigma. U-Net sizes 'auto' resolve per image size (pipeline/defaults.py)."""

    arch: Literal["auto", "mlp", "unet"] = "auto"
    hidden: int = Field(128, ge=1)
    blocks: int = Field(3, ge=1)
    emb_dim: int = Field(64, ge=2)
    scale_by_sigma: bool = True
    channels: Union[Auto, int] = "auto"
    channel_mult: Union[Auto, list[int]] = "auto"
    num_res_blocks: Union[Auto, int] = "auto"
    attn_resolutions: Union[Auto, list[int]] = "auto"
    dropout: Union[Auto, float] = "auto"

    @field_validator("channels", "num_res_blocks")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)

    @field_validator("channel_mult")
    @classmethod
    def _multipliers(cls, v):
        if v != "auto" and (not v or any(m < 1 for m in v)):
            raise ValueError("must be 'auto' or a non-empty list of integers >= 1")
        return v

    @field_validator("dropout")
    @classmethod
    def _probability(cls, v):
        if v != "auto" and not 0.0 <= v < 1.0:
            raise ValueError("must be 'auto' or a number in [0, 1)")
        return v

    @field_validator("emb_dim")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError("must be even (sine and cosine halves)")
        return v


class MethodParams(_Section):
    """The method and its choices; 'auto' resolves per method family (families/), bad combinations are refused.
    A family's own section (method.sb, method.fm) is validated by that family alone (its pydantic model)."""

    name: Literal[NAMES] = "ncsnv2"
    # The keys one family or another owns: each is validated by the family that reads it (its Params model,
    # families/base.py), and a family that does not read one refuses it away from its default.
    sde: Any = OWNED_KEYS["sde"]
    schedule: Any = OWNED_KEYS["schedule"]
    num_steps: Any = OWNED_KEYS["num_steps"]
    sigma_data: Any = OWNED_KEYS["sigma_data"]
    sb: dict[str, Any] = Field(default_factory=dict)
    fm: dict[str, Any] = Field(default_factory=dict)
    loss: Literal[("auto", *LOSSES)] = "auto"
    weighting: Literal["sigma2", "likelihood"] = "sigma2"
    parameterization: Literal[("auto", *PARAMETERIZATIONS)] = "auto"
    t_sampling: Literal["uniform", "importance"] = "uniform"
    conditional: bool = False
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class PosthocParams(_Section):
    """The power-function EMAs training keeps for post-hoc EMA (Karras et al. 2024, sec. 3): their widths sigma_rel
    ([]: none, no snapshots) and the steps between snapshots of them ('auto': train.steps / 20)."""

    sigma_rels: list[float] = Field(default_factory=lambda: list(SIGMA_RELS))
    snapshot_every: Union[Auto, int] = "auto"

    @field_validator("sigma_rels")
    @classmethod
    def _widths(cls, v):
        for s in v:
            if not 0.0 < s <= SIGMA_REL_MAX:
                raise ValueError(f"each must be in (0, {SIGMA_REL_MAX:.4f}] (the uniform average is the widest "
                                 f"power-function profile), got {s}")
        if len(set(v)) != len(v):
            raise ValueError(f"must differ from each other, got {v}")
        return v

    @field_validator("snapshot_every")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)


class TrainParams(_Section):
    """Optimisation, EMA (technique 5), checkpointing, the device and the held-out evaluation during training;
    'auto' steps / batch / lr resolve per data set (pipeline/defaults.py). GPU speed: precision (autocast),
    tf32, channels_last, compile; accumulate splits each batch into micro-batches; warmup ramps the lr linearly;
    lr_decay takes it to zero over the run after that; devices: processes on this node (torchrun), each taking an
    equal share of every micro-batch."""

    steps: Union[Auto, int] = "auto"
    batch_size: Union[Auto, int] = "auto"
    lr: Union[Auto, float] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    ema_warmup: Union[Auto, bool] = "auto"
    checkpoint_every: int = Field(1_000, ge=1)
    log_every: int = Field(50, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = True
    channels_last: bool = False
    compile: bool = False
    accumulate: int = Field(1, ge=1)
    warmup: int = Field(0, ge=0)
    lr_decay: Union[Auto, Literal[LR_DECAYS]] = "auto"
    devices: int = Field(1, ge=1)  # after batch_size and accumulate: its check reads them
    posthoc: PosthocParams = Field(default_factory=PosthocParams)

    @field_validator("steps")
    @classmethod
    def _non_negative(cls, v):
        return auto_or_at_least(v, 0)

    @field_validator("accumulate")
    @classmethod
    def _whole_micro_batches(cls, v, info):  # info: pydantic's ValidationInfo, the fields before
        # 'auto' batch sizes are checked by the train stage once resolved (pipeline/defaults.py)
        batch = info.data.get("batch_size")
        if isinstance(batch, int) and batch % v:
            raise ValueError(f"must divide train.batch_size ({batch}): each step splits its batch into "
                             f"train.accumulate equal micro-batches")
        return v

    @field_validator("batch_size")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)

    @field_validator("devices")
    @classmethod
    def _whole_shares(cls, v, info):
        # 'auto' batch sizes (and a world size torchrun sets) are checked by the train stage
        batch, accumulate = info.data.get("batch_size"), info.data.get("accumulate")
        if isinstance(batch, int) and isinstance(accumulate, int) and batch % (v * accumulate):
            raise ValueError(f"train.batch_size ({batch}) must be a multiple of train.devices x train.accumulate "
                             f"({v} x {accumulate}): each process takes an equal share of every micro-batch")
        return v

    @field_validator("lr")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v


class InpaintParams(_Section):
    """sample.task: inpaint (pipeline.inpaint): the method(s), each run on the same items and shown side by side, the
    mask, and the methods' options."""

    method: Union[Literal[INPAINT_METHODS], list[Literal[INPAINT_METHODS]]] = "replace"
    mask: Literal[("auto", *MASKS)] = "auto"
    keep: float = Field(0.5, gt=0.0, lt=1.0)
    alpha: Union[Auto, float] = "auto"
    zeta: Union[Auto, float] = "auto"
    jump: int = Field(10, ge=1)
    resamples: int = Field(10, ge=1)

    @property
    def methods(self) -> list[str]:
        """The methods in order, each once."""
        chosen = [self.method] if isinstance(self.method, str) else list(self.method)
        return list(dict.fromkeys(chosen))

    @field_validator("alpha", "zeta")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or >= 0")
        return v


class InverseParams(InpaintParams):
    """sample.task: inverse (pipeline.inverse): y = A x + noise n of the first sample.n test items, A the
    `operator` (its keys: mask and keep; factor; width; matrix), solved by each method as inpainting is."""

    operator: Literal[OPERATORS] = "mask"
    factor: int = Field(2, ge=1)
    width: float = Field(1.0, gt=0.0)
    matrix: Optional[list[list[float]]] = None
    noise: float = Field(0.0, ge=0.0)
    seed: int = 0


class InterpolateParams(_Section):
    """sample.task: interpolate (pipeline.interpolate): `pairs` rows of `frames` samples between samples 2j and
    2j + 1 of the plain run, by the noise-interpolation `scheme`."""

    scheme: Literal["auto", "ncsnv2", "slerp"] = "auto"
    pairs: int = Field(8, ge=1)
    frames: int = Field(10, ge=2)


class EditParams(_Section):
    """sample.task: edit (SDEdit, pipeline.edit): the fractions t0 of the sampling walk each test item is noised
    to and denoised from."""

    t0: Union[float, list[float]] = Field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])

    @property
    def times(self) -> list[float]:
        return [self.t0] if isinstance(self.t0, float) else list(self.t0)

    @field_validator("t0")
    @classmethod
    def _fractions(cls, v):
        values = [v] if isinstance(v, float) else v
        if not values or any(not 0.0 < t <= 1.0 for t in values):
            raise ValueError("must be a fraction in (0, 1] of the sampling walk, or a non-empty list of them")
        return v


class SampleParams(_Section):
    """The sampler and its options (each option is read only by the samplers named in its comment)."""

    n: Union[Auto, int] = "auto"
    seed: int = 0
    batch_size: Union[Auto, int] = "auto"
    sampler: Literal[("auto", *SAMPLERS)] = "auto"
    steps: Union[Auto, int] = "auto"
    denoise: bool = True
    clip_denoised: Union[Auto, bool] = "auto"
    guidance: float = 0.0
    classes: Union[Auto, list[int]] = "auto"
    variance: Literal["beta_tilde", "beta"] = "beta_tilde"
    eta: float = Field(0.0, ge=0.0, le=1.0)
    predictor: Literal["reverse_diffusion", "euler_maruyama", "ancestral"] = "reverse_diffusion"
    corrector: Literal["langevin", "ald", "none"] = "langevin"
    snr: float = Field(0.16, gt=0.0)
    corrector_steps: int = Field(1, ge=1)
    lam: float = Field(0.0, ge=0.0, le=1.0)
    ode_method: Literal["rk45", "euler", "heun"] = "rk45"
    rtol: float = Field(1e-5, gt=0.0)
    atol: float = Field(1e-5, gt=0.0)
    spacing: Literal["auto", "karras", "logsnr", "time"] = "auto"
    rho: float = Field(7.0, gt=0.0)
    churn: float = Field(0.0, ge=0.0)
    s_tmin: float = Field(0.0, ge=0.0)
    s_tmax: Optional[float] = Field(None, gt=0.0)
    s_noise: float = Field(1.0, gt=0.0)
    devices: int = Field(1, ge=1)
    task: Literal[TASKS] = "generate"
    direction: Literal["forward", "backward"] = "forward"
    inpaint: InpaintParams = Field(default_factory=InpaintParams)
    inverse: InverseParams = Field(default_factory=InverseParams)
    interpolate: InterpolateParams = Field(default_factory=InterpolateParams)
    edit: EditParams = Field(default_factory=EditParams)

    @field_validator("steps", "n", "batch_size")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)


class EvalParams(_Section):
    """Point-cloud metrics (`n` points each side, clouds of `cloud_size` for CD, `emd_n` for EMD), image metrics
    (FID/KID on `fid_n` samples, fid_domain with a classifier trained `classifier_steps`) and likelihoods."""

    n: Union[Auto, int] = "auto"
    cloud_size: int = Field(100, ge=1)
    emd_n: int = Field(2_000, ge=1)
    ot_n: int = Field(2_000, ge=2)
    fid_n: Union[Auto, int] = "auto"
    fid_against: Literal["test", "train"] = "test"
    fid_seeds: int = Field(1, ge=1)
    classifier_steps: int = Field(1_000, ge=1)
    likelihood: bool = False
    likelihood_n: int = Field(1_000, ge=1)
    divergence: Literal["auto", "exact", "rademacher", "gaussian"] = "auto"
    rtol: float = Field(1e-5, gt=0.0)
    atol: float = Field(1e-5, gt=0.0)
    elbo_slices: int = Field(20, ge=1)
    elbo_variance: Literal["beta", "beta_tilde"] = "beta"
    seed: int = 0

    @field_validator("n")
    @classmethod
    def _at_least_one(cls, v):
        return auto_or_at_least(v, 1)

    @field_validator("fid_n")
    @classmethod
    def _at_least_two(cls, v):
        return auto_or_at_least(v, 2)


class EmaParams(_Section):
    """The ema stage: the final model is the decay EMA training kept (train.ema_decay, NCSNv2 technique 5), the
    post-hoc EMA of width sigma_rel reconstructed from train.posthoc's snapshots (Karras et al. 2024), or the raw
    weights (none)."""

    method: Literal[EMA_METHODS] = "decay"
    sigma_rel: float = Field(0.10, gt=0.0, le=SIGMA_REL_MAX)


class DistillParams(_Section):
    """The distill stage's consistency model: method (cd: consistency distillation, Song et al. 2023, Algorithm 2;
    ect: easy consistency tuning, Geng et al. 2024), cd's teacher ODE discretisation N (num_scales, 18 as Song et
    al. on CIFAR-10), the student's training steps (auto: train's) and learning rate (auto:
    pipeline.defaults.distill_lr)."""

    method: Literal[DISTILL_METHODS] = "none"
    num_scales: int = Field(18, ge=2)
    steps: Union[Literal["auto"], int] = "auto"
    lr: Union[Literal["auto"], float] = "auto"

    @field_validator("lr")
    @classmethod
    def _lr(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        return auto_or_at_least(v, 1)


class TrackingParams(_Section):
    """The MLflow experiment name (the store comes from MLFLOW_TRACKING_URI or the repo's mlflow.db)."""

    experiment: str = "score-pipeline"


class Config(_Section):
    """The whole of params.yaml."""

    seed: int = 0
    data: DataParams = Field(default_factory=DataParams)
    noise: NoiseParams = Field(default_factory=NoiseParams)
    model: ModelParams = Field(default_factory=ModelParams)
    method: MethodParams = Field(default_factory=MethodParams)
    train: TrainParams = Field(default_factory=TrainParams)
    ema: EmaParams = Field(default_factory=EmaParams)
    distill: DistillParams = Field(default_factory=DistillParams)
    sample: SampleParams = Field(default_factory=SampleParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        d, e, m, s = self.data, self.eval, self.method, self.sample
        family = families.get(m.name)  # imports that family's package alone
        p = families.plan(self)  # the family's plan, a consistency model's where distill.method asks for one
        family.check_data(d.name)
        _check_data(d)
        if d.target_path is not None and d.target != "file":
            raise ValueError("data.target_path names the file of data.target: file; leave it null")
        _check_conditional(self)
        family.check(self, p)
        _check_task(self, p.sampler)
        if s.clip_denoised is True and d.kind == "points":
            raise ValueError(f"sample.clip_denoised clips x0_hat to the pixel range of images; data.name: {d.name} "
                             f"is a point set (leave sample.clip_denoised: auto or false)")
        if d.kind == "points":
            _check_point_sizes(self)
        if d.kind == "points" and self.model.arch == "unet":
            raise ValueError(f"model.arch: unet is for images; data.name: {d.name} is points (use auto or mlp)")
        n_test = d.n_test if d.n_test != "auto" else (POINT_SIZES if d.kind == "points" else None)
        if e.likelihood and n_test is not None and e.likelihood_n > n_test:
            raise ValueError(f"eval.likelihood_n ({e.likelihood_n}) must be <= data.n_test ({n_test})")
        if d.kind == "images" and e.likelihood and e.divergence == "exact":
            raise ValueError("eval.divergence: exact takes one backward pass per pixel and ODE step on images; use "
                             "auto or rademacher (Hutchinson, score_sde's choice) or gaussian")
        if e.fid_n != "auto" and d.kind == "images":
            for key, have in (("sample.n", self.sample.n), ("data.n_test", d.n_test), ("data.n_reference", d.n_reference)):
                if have != "auto" and e.fid_n > have:
                    raise ValueError(f"eval.fid_n ({e.fid_n}) must be <= {key} ({have}): FID compares eval.fid_n "
                                     f"images each side")
        _check_fid_seeds(self)
        if self.ema.method == "posthoc" and not self.train.posthoc.sigma_rels:
            raise ValueError("ema.method: posthoc reconstructs an EMA from the snapshots of train.posthoc.sigma_rels, "
                             "and it is empty: training keeps none (list the widths to track, e.g. [0.05, 0.10])")
        if self.ema.method == "posthoc" and not family.posthoc_ema:
            raise ValueError(f"ema.method: posthoc reconstructs an EMA from the snapshots pipeline.train keeps; "
                             f"method.name: {m.name} trains otherwise and keeps none (use ema.method: decay or none)")
        if self.ema.method != "posthoc" and self.ema.sigma_rel != EmaParams().sigma_rel:
            raise ValueError("ema.sigma_rel is the width of the post-hoc EMA; set ema.method: posthoc (or leave "
                             f"ema.sigma_rel: {EmaParams().sigma_rel:g})")
        return self


def _check_fid_seeds(cfg: "Config") -> None:
    """eval.fid_seeds K > 1: K sets of eval.fid_n generated images, so images, sample.task: generate, and (where
    both are set) sample.n >= K eval.fid_n."""
    k, s = cfg.eval.fid_seeds, cfg.sample
    if k == 1:
        return
    if cfg.data.kind != "images":
        raise ValueError(f"eval.fid_seeds: {k} repeats FID on images; data.name: {cfg.data.name} is points (cd "
                         "already averages eval.n / eval.cloud_size clouds): leave eval.fid_seeds: 1")
    if s.task != "generate":
        raise ValueError(f"eval.fid_seeds: {k} repeats FID over sets of generated images; sample.task: {s.task} "
                         "makes its outputs from test items: leave eval.fid_seeds: 1")
    if s.n != "auto" and cfg.eval.fid_n != "auto" and s.n < k * cfg.eval.fid_n:
        raise ValueError(f"sample.n ({s.n}) must be >= eval.fid_seeds x eval.fid_n ({k} x {cfg.eval.fid_n}): each "
                         "FID set has eval.fid_n samples of its own (or leave sample.n: auto)")


def _check_conditional(cfg: "Config") -> None:
    """Class conditioning needs labels (the family checks that it has a score to guide); guidance keys need a
    conditional model."""
    d, m, s = cfg.data, cfg.method, cfg.sample
    if not m.conditional:
        for key, value, default in (("guidance", s.guidance, 0.0), ("classes", s.classes, "auto")):
            if value != default:
                raise ValueError(f"sample.{key} guides a class-conditional model; set method.conditional: true (and "
                                 f"retrain) or leave sample.{key}: {default}")
        return
    if d.kind == "points" and d.name not in LABELLED_POINTS:
        raise ValueError(f"method.conditional needs class labels; data.name: {d.name} has none (labelled 2-D sets: "
                         f"{', '.join(LABELLED_POINTS)}; every image set)")
    if s.classes != "auto" and (not s.classes or min(s.classes) < 0):
        raise ValueError(f"sample.classes must be 'auto' or a non-empty list of 0-based classes, got {s.classes}")


def _check_task(cfg: "Config", sampler: str) -> None:
    """sample.task and its keys: each task's keys only with it, masks that fit the data, samplers a task can wrap."""
    d, s = cfg.data, cfg.sample
    defaults = SampleParams()
    for task in ("inpaint", "inverse", "interpolate", "edit"):
        if s.task != task and getattr(s, task) != getattr(defaults, task):
            raise ValueError(f"sample.{task}.* applies to sample.task: {task}; this run's task is {s.task} (set "
                             f"sample.task: {task} or leave sample.{task} at its defaults)")
    if s.task == "generate":
        return
    if s.guidance != 0.0 or s.classes != "auto":
        raise ValueError(f"sample.guidance and sample.classes steer sample.task: generate; sample.task: {s.task} uses "
                         "a conditional model's null label (its unconditional model)")
    if s.devices > 1:
        raise ValueError(f"sample.devices: {s.devices} shards sample.task: generate only; run sample.task: {s.task} "
                         "in one process")
    if s.task in ("inpaint", "inverse", "edit") and s.sampler == "ode" and s.ode_method == "rk45":
        # inpainting and editing wrap a step over a fixed grid, which SciPy's RK45 does not walk
        raise ValueError(f"sample.task: {s.task} wraps a step over a fixed grid, and the rk45 ODE solver picks its own "
                         "times: set sample.ode_method: euler or heun")
    n_test = d.n_test if d.n_test != "auto" else (POINT_SIZES if d.kind == "points" else None)
    if s.task in ("inpaint", "inverse", "edit") and s.n != "auto" and n_test is not None and s.n > n_test:
        raise ValueError(f"sample.n ({s.n}) must be <= data.n_test ({n_test}): sample.task: {s.task} works on the "
                         "first sample.n held-out test items")
    if s.task not in ("inpaint", "inverse"):
        return
    p, key = (s.inpaint, "sample.inpaint") if s.task == "inpaint" else (s.inverse, "sample.inverse")
    if getattr(p, "operator", "mask") == "mask":
        if d.kind == "points" and p.mask in ("box", "half"):
            raise ValueError(f"{key}.mask: {p.mask} is for images; data.name: {d.name} is points (first or random)")
        if d.kind == "images" and p.mask == "first":
            raise ValueError(f"{key}.mask: first keeps coordinate 0 of points; images take box, half or random")
    if "langevin" in p.methods and sampler != "annealed_langevin":
        raise ValueError(f"{key}.method langevin is Song & Ermon's Algorithm 2 around the annealed_langevin "
                         f"sampler (NCSN's noise scales), not {sampler}; use replace, repaint, mcg or dps")
    if s.task == "inverse":
        _check_inverse(cfg, s.inverse)


def _check_inverse(cfg: "Config", p: "InverseParams") -> None:
    """sample.inverse: the operator's keys only with it, an operator of the data's kind that fits what is known of
    its shape here (the sample stage checks the rest on the data), noise only for the methods that allow it."""
    d, op = cfg.data, p.operator
    keys = {"mask": ("mask", "keep"), "downsample": ("factor",), "blur": ("width",), "matrix": ("matrix",),
            "colorize": ()}
    fresh = InverseParams()
    for other, owned in keys.items():
        for k in owned:
            if other != op and getattr(p, k) != getattr(fresh, k):
                raise ValueError(f"sample.inverse.{k} applies to sample.inverse.operator: {other}; this run's operator "
                                 f"is {op} (leave sample.inverse.{k} at its default)")
    kind = {"colorize": "images", "downsample": "images", "blur": "images", "matrix": "points"}.get(op, d.kind)
    if kind != d.kind:
        raise ValueError(f"sample.inverse.operator: {op} measures {kind}; data.name: {d.name} is {d.kind} "
                         f"(images take mask, colorize, downsample, blur; points mask, matrix)")
    if op == "colorize" and (d.channels == 1 or (d.channels == "auto" and d.name in GREY_SETS)):
        raise ValueError(f"sample.inverse.operator: colorize needs colour images; data.name: {d.name} is grey "
                         "(data.channels 1); use e.g. data.name: photos")
    if op == "downsample" and d.image_size is not None and d.image_size % p.factor:
        raise ValueError(f"sample.inverse.factor ({p.factor}) must divide the image side data.image_size "
                         f"({d.image_size})")
    if op == "matrix":
        if p.matrix is None or not p.matrix or any(len(row) != len(p.matrix[0]) for row in p.matrix):
            raise ValueError("sample.inverse.operator: matrix needs sample.inverse.matrix, a K x D list of rows, e.g. "
                             "[[1, 1]] on 2-D points (only the sum of the coordinates is seen)")
        if d.name in POINT_SETS and len(p.matrix[0]) != 2:
            raise ValueError(f"sample.inverse.matrix has rows of {len(p.matrix[0])} entries; data.name: {d.name} is "
                             "2-D points: each row needs 2")
    projecting = [m for m in p.methods if m in ("replace", "langevin", "repaint")]
    if p.noise > 0 and projecting:
        raise ValueError(f"sample.inverse.method {', '.join(projecting)} puts the measurement into x exactly, which "
                         f"is wrong with sample.inverse.noise {p.noise}: use dps (or mcg)")


_IMAGE_ONLY = (("download", False), ("image_size", None), ("upscale", False), ("channels", "auto"), ("scaling", "auto"),
               ("dequantize", False), ("hflip", False))


def _is(path: Path, kind: str) -> bool:
    """Whether `path` is an existing file ('file') or directory ('dir'); False for a path the OS cannot even look
    up (a name too long, a NUL byte) rather than an OSError."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False


def _holds_nothing(path: Optional[str]) -> bool:
    """No data.path, or the default folder with nothing but its README: a data set that must be read from files has
    none (a path that does not exist here may exist where the run goes, e.g. a preset for a cluster)."""
    if path is None:
        return True
    p = Path(path)
    return _is(p, "dir") and all(f.name == "README.md" for f in p.iterdir())


def _check_data(d: DataParams) -> None:
    """Refuse data keys that cannot apply, and missing files, before any stage runs."""
    if d.kind == "points":
        for key, default in _IMAGE_ONLY:
            if getattr(d, key) != default:
                raise ValueError(f"data.{key} applies to images; data.name: {d.name} is a 2-D point set "
                                 f"(leave data.{key}: {default if default is not None else 'null'})")
    if d.labels_path is not None and d.name != "file":
        raise ValueError("data.labels_path names the labels of a data.name: file image array; leave it null")
    if d.name == "file":
        if d.path in (None, DEFAULT_DATA_PATH):
            raise ValueError("data.path must name a .npy or .csv file when data.name is file: points (N, D) or "
                             "uint8 images (N, C, H, W)")
        p = Path(d.path)
        if p.suffix.lower() not in (".npy", ".csv"):
            raise ValueError(f"data.path must end in .npy or .csv, got {d.path!r}")
        if not _is(p, "file"):
            raise ValueError(f"data.path {d.path!r} does not exist or is not a file")
        if d.labels_path is not None and not _is(Path(d.labels_path), "file"):
            raise ValueError(f"data.labels_path {d.labels_path!r} does not exist or is not a file")
    if d.name == "folder":
        if d.path in (None, DEFAULT_DATA_PATH) or not _is(Path(d.path), "dir"):
            raise ValueError(f"data.name: folder needs data.path to name a directory of images (class subfolders "
                             f"optional), got {d.path!r}")
    if d.name == "photos" and d.image_size is not None and d.image_size > PHOTOS_CROP:
        raise ValueError(f"data.image_size: {d.image_size} is larger than the {PHOTOS_CROP}x{PHOTOS_CROP} crops "
                         f"data.name: photos cuts from its photographs; use at most {PHOTOS_CROP} (null: "
                         f"{PHOTOS_IMAGE_SIZE})")
    if d.name in ("mnist", "cifar10") and not d.download and _holds_nothing(d.path):
        raise ValueError(f"data.name: {d.name} needs its official files: set data.path to the folder that holds "
                         f"them, or data.download: true on a machine with internet")


def _check_point_sizes(cfg: "Config") -> None:
    """eval.n, cloud_size and emd_n against the resolved point counts ('auto' is POINT_SIZES)."""
    d, e = cfg.data, cfg.eval
    size = lambda v: POINT_SIZES if v == "auto" else v  # noqa: E731
    n = size(e.n)
    compared = [("data.n_test", d.n_test), ("data.n_reference", d.n_reference)]
    if cfg.sample.task == "generate":  # the other tasks' outputs are not compared with eval.n points
        compared.insert(0, ("sample.n", cfg.sample.n))
    for key, have in compared:
        if n > size(have):
            raise ValueError(f"eval.n ({n}) must be <= {key} ({size(have)}): metrics compare eval.n points each side")
    if e.cloud_size > n:
        raise ValueError(f"eval.cloud_size ({e.cloud_size}) must be <= eval.n ({n})")
    if e.emd_n > n:
        raise ValueError(f"eval.emd_n ({e.emd_n}) must be <= eval.n ({n})")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-3` is a string; accept YAML 1.2 floats as `dvc exp run -S` writes them.

    A key written twice in one mapping is refused, as DVC's own reader (ruamel.yaml) does: PyYAML would keep
    the last value silently, so the stages would run on another value than the one DVC records."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: list[tuple[type, Any]] = []  # by type too: `1:` and `true:` are different keys (1 == True)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if (type(key), key) in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.append((type(key), key))
        return super().construct_mapping(node, deep=deep)


# Digits are required before or after the point: "." or "-" alone stay strings (PyYAML's float() of them fails).
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _refuse_unreadable(construct: Any) -> Any:
    """PyYAML's scalar constructor, raising a YAMLError (not ValueError, KeyError...) on a scalar it cannot read,
    e.g. an explicitly tagged `!!float abc` or `!!bool maybe`."""

    def constructor(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value!r} as {node.tag}",
                                                    node.start_mark) from None
    return constructor


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                         ("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _Yaml12Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_unreadable(_construct))

# Union members show up in pydantic's locations ("int", "literal['auto']"); they are not keys.
_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list\[.*\]|literal\[.*\]|function-.*)$")


def _key_name(key: Any) -> str:
    """A key the user wrote, as the message shows it: plain, or repr where plain text would hide it (empty,
    spaces around it, a newline, not a string)."""
    plain = isinstance(key, str) and key and key == key.strip() and key.isprintable()
    return key if plain else repr(key)


def _location(err: dict[str, Any], prefix: str = "") -> str:
    """The dotted key of a pydantic error. The last part of an unknown or non-string key is the user's own (kept
    even when it reads like a union member; a non-string key by its value, not pydantic's str of it)."""
    parts = list(err["loc"])
    key_of_dict = len(parts) >= 2 and parts[-1] == "[key]"  # a dict field's (method.sb's) key that is no string
    own = (err["type"] in ("extra_forbidden", "invalid_key") and bool(parts)) or key_of_dict
    if own:
        last = err["input"] if err["type"] == "invalid_key" or key_of_dict else parts[-1]
        parts = parts[:-2] if key_of_dict else parts[:-1]
    path = [prefix] * bool(prefix) + [str(p) for p in parts if not _UNION_MEMBER.match(str(p))]
    return ".".join(path + [_key_name(last)] if own else path)


def _section_model(loc: tuple, root: type[BaseModel]) -> type[BaseModel]:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return model


def messages(exc: ValidationError, prefix: str = "", root: Optional[type[BaseModel]] = None) -> list[str]:
    """One line per bad key: 'key: what is wrong (got value)'; union alternatives joined by 'or'. For a model
    validated on its own (a family's Params), root is that model and prefix its section ('method')."""
    by_loc: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        by_loc.setdefault(_location(err, prefix), []).append(err)
    lines = []
    for loc, errs in by_loc.items():
        if errs[0]["type"] == "extra_forbidden" and loc in MOVED:
            lines.append(f"{loc}: moved to {MOVED[loc]}")
            continue
        if errs[0]["type"] == "extra_forbidden":
            section = errs[0]["loc"][:-1]
            allowed = ", ".join(_section_model(section, root or Config).model_fields)
            where = ".".join([prefix] * bool(prefix) + list(map(str, section))) or "the top level"
            lines.append(f"{loc}: unknown key (allowed under {where}: {allowed})")
            continue
        msgs = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errs))
        got = f" (got {errs[0]['input']!r})" if loc else ""
        lines.append(f"{loc + ': ' if loc else ''}{msgs}{got}")
    return lines


def validate(raw: Any) -> Config:
    """Validate a parsed params mapping; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid params:\n  " + "\n  ".join(messages(exc))) from None


def load(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml; raise ConfigError with every bad key named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    try:
        raw = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: not valid params: collections nested too deeply") from None
    if raw is None:  # an empty file (or only comments) would silently run on the built-in defaults
        raise ConfigError(f"{path}: is empty; params must be a mapping of sections (seed, data, noise, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: params must be a mapping of sections, got {type(raw).__name__}")
    return validate(raw)


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config (or a section) as plain JSON-able data."""
    return cfg.model_dump(mode="json")
