"""What every 'auto' size resolves to, per data kind and image size: one table, read by the stages.

The 2-D values are the ones the swiss-roll runs were tuned and measured with. The image values are
sized so that a whole pipeline fits a 2-core CPU (digits 8x8: about 6 minutes; 28x28: about an
hour at 2,000 FID samples with a few-step sampler); a GPU user raises `train.steps`, `model.channels` and `eval.fid_n`
(the paper presets do). Every resolved value is written into a stage output (the data
record, the model file's spec, metrics/train.json, metrics/sample.json), so a run says what it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    import torch

# data.n_*, sample.n, eval.n and sample.batch_size for the 2-D sets (config.POINT_SIZES).
POINT_SIZES = 10_000
# data.path when none is set: a folder in the repo, empty but for a README (DVC needs an existing path to depend
# on); data.download puts MNIST and CIFAR-10 there.
DATA_PATH = "data/raw"
POINT_TRAIN = {"steps": 5_000, "batch_size": 512, "lr": 1e-3}
# data.name: photos (pipeline/data/photos.py): the side of its square crops, which is the largest data.image_size it
# takes, and the side its crops are resized to when data.image_size is null.
PHOTOS_CROP = 64
PHOTOS_IMAGE_SIZE = 16
# Post-hoc EMA (pipeline.posthoc): EDM2's two tracked profiles (Karras et al. 2024, sec. 3.2: sigma_rel 0.05
# and 0.10); the widest power-function profile (gamma = 0, the uniform average: sqrt(1/12)); snapshots per run
# (train.posthoc.snapshot_every: auto is train.steps / POSTHOC_SNAPSHOTS).
SIGMA_RELS = (0.05, 0.10)
SIGMA_REL_MAX = 12.0 ** -0.5
POSTHOC_SNAPSHOTS = 20
# train.lr_decay: auto for images: the lr falls to zero over the run. On digits (fp32, 2,000 steps, NCSNv2; the
# mean fid of three sample sets of 300, benchmarks/ablation.py) constant 29.78, linear 29.15, cosine 28.74. Points
# keep a constant lr (and the 2-D runs their bits).
IMAGE_LR_DECAY = "cosine"


@dataclass(frozen=True)
class ImageDefaults:
    """The 'auto' values for images of one size class."""

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    dropout: float
    steps: int
    batch_size: int
    lr: float
    fid_n: int
    sample_batch_size: int
    # NCSNv2's Langevin steps per noise scale (noise.steps_per_scale: auto); None: the paper's T = 5
    langevin_steps: Optional[int] = None


# Keyed by the largest image side they serve. DDPM's CIFAR-10 network (Ho et al. 2020, appendix B) is
# channels 128, mult (1, 2, 2, 2), 2 blocks, dropout 0.1, lr 2e-4, batch 128: far too slow for a CPU,
# so the small classes keep its shape at a fraction of the width. The <= 16 row's lr, dropout and Langevin steps
# were chosen by the digits ablation (benchmarks/ablation.py, docs/benchmarks.md: with the cosine lr decay, T = 10
# gives a mean fid of 27.54 over three sample sets against 28.74 at T = 5, for 105 more network evaluations a
# sample over digits' 21 scales); NCSNv2 on the larger classes keeps the paper's 5 (28x28 already has ~100
# scales). The <= 32 row's steps fill Fashion-MNIST's hour on a 2-core CPU under bf16 (EDM: 0.35 s a step;
# fid_reference, classifier, sample, evaluate: 1,105 s), with the <= 16 row's findings (no dropout, a higher lr)
# carried over.
IMAGE_CLASSES: tuple[tuple[int, ImageDefaults], ...] = (
    (16, ImageDefaults(channels=32, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0, steps=2_000,
                       batch_size=128, lr=2e-3, fid_n=2_000, sample_batch_size=500, langevin_steps=10)),
    (32, ImageDefaults(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, steps=7_000,
                       batch_size=64, lr=1e-3, fid_n=2_000, sample_batch_size=250)),
    (10**9, ImageDefaults(channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1, steps=20_000,
                          batch_size=64, lr=2e-4, fid_n=2_000, sample_batch_size=100)),
)


def image_defaults(shape: tuple[int, ...]) -> ImageDefaults:
    """The defaults for images of shape (C, H, W): the first class whose side bound covers max(H, W)."""
    side = max(shape[-2:])
    return next(d for bound, d in IMAGE_CLASSES if side <= bound)


def langevin_steps(data: Mapping[str, Any]) -> Optional[int]:
    """The T per noise scale NCSNv2's annealed Langevin takes for noise.steps_per_scale: auto on this data (the
    record: kind, shape): the image class's langevin_steps, None (the paper's 5) for points and the other classes."""
    return image_defaults(tuple(data["shape"])).langevin_steps if data["kind"] == "images" else None


def _pick(value: Any, auto: Any) -> Any:
    return auto if value == "auto" else value


def lowest_resolution(shape: tuple[int, ...], channel_mult) -> int:
    """The feature-map side at the U-Net's deepest level: H halved (rounding up) once per extra level."""
    side = shape[-2]
    for _ in range(len(channel_mult) - 1):
        side = (side + 1) // 2
    return side


def network_spec(model: Mapping[str, Any], data: Mapping[str, Any], parameterization: str,
                 num_classes: int = 0) -> dict:
    """The network's spec (pipeline.nets.build_network) from model.* and the data record: 'auto' arch is the
    U-Net for images and the MLP for points; U-Net sizes 'auto' resolve by image size; attention 'auto' is at
    the lowest resolution (DDPM puts it at 16x16 of 32x32, one level above; at 8x8 and 28x28 the lowest
    level is the cheap one). num_classes > 0: a class-conditional network (method.conditional); the MLP's
    spec names it only then, so unconditional model files keep their bytes."""
    shape = tuple(data["shape"])
    arch = model["arch"] if model["arch"] != "auto" else ("unet" if data["kind"] == "images" else "mlp")
    if arch == "mlp":
        dim = 1
        for s in shape:
            dim *= s
        spec = {"kind": "mlp", "dim": dim, "hidden": model["hidden"], "blocks": model["blocks"],
                "emb_dim": model["emb_dim"], "parameterization": parameterization}
        return {**spec, "num_classes": num_classes} if num_classes else spec
    if len(shape) != 3:
        raise ValueError(f"model.arch: unet needs images (C, H, W); the data has shape {list(shape)}")
    d = image_defaults(shape)
    mult = [int(m) for m in _pick(model["channel_mult"], d.channel_mult)]
    attn = _pick(model["attn_resolutions"], [lowest_resolution(shape, mult)])
    return {"kind": "unet", "shape": list(shape), "channels": int(_pick(model["channels"], d.channels)),
            "channel_mult": mult, "num_res_blocks": int(_pick(model["num_res_blocks"], d.num_res_blocks)),
            "attn_resolutions": [int(a) for a in attn], "dropout": float(_pick(model["dropout"], d.dropout)),
            "num_classes": num_classes, "parameterization": parameterization}


def edm_spec(spec: Mapping[str, Any], sigma_data: float) -> dict:
    """The spec of EDM's preconditioning (pipeline.nets.edm) around the network `spec`, which then outputs x0."""
    return {"kind": "edm", "sigma_data": float(sigma_data), "parameterization": "x0", "net": dict(spec)}


def train_settings(train: Mapping[str, Any], data: Mapping[str, Any], bf16: bool = False) -> dict:
    """train.steps / batch_size / lr / ema_warmup / precision / lr_decay / posthoc.snapshot_every with 'auto'
    resolved for the data kind and image size (snapshots: train.steps / POSTHOC_SNAPSHOTS, at least every step;
    lr_decay: IMAGE_LR_DECAY for images, none for points).

    Precision 'auto' is bf16 autocast for images where the training device computes bf16 natively (`bf16`,
    pipeline.devices.bf16_native), fp32 otherwise and for points: on this project's 2-core CPU bf16 trains the
    digits U-Net 18 % faster at an equal FID (docs/benchmarks.md, the image-defaults ablation), and the 2-D runs
    keep their bits.

    The EMA warm-up is on for images, whose short CPU runs would otherwise keep a visible share of the random
    initial weights (pipeline.train.ema_multi_avg_fn); off for points, whose 5,000 steps keep 0.7 % and whose
    default run keeps its bits.
    """
    if data["kind"] == "images":
        d = image_defaults(tuple(data["shape"]))
        auto = {"steps": d.steps, "batch_size": d.batch_size, "lr": d.lr, "ema_warmup": True,
                "precision": "bf16" if bf16 else "fp32", "lr_decay": IMAGE_LR_DECAY}
    else:
        auto = {**POINT_TRAIN, "ema_warmup": False, "precision": "fp32", "lr_decay": "none"}
    resolved = {k: _pick(train[k], v) for k, v in auto.items()}
    every = train.get("posthoc", {}).get("snapshot_every", "auto")
    return resolved | {"snapshot_every": int(_pick(every, max(1, resolved["steps"] // POSTHOC_SNAPSHOTS)))}


# A consistency model fine-tunes the teacher's weights: its learning rate is the teacher's times this, per
# distill.method. Measured on the swiss roll, 1 NFE from the rectified flow, 5,000 steps: cd (python -m
# benchmarks.distill_lr, N = 18, the EMA's samples; docs/benchmarks.md): lr 1e-3 (the teacher's) gives cd 0.346, 1e-4
# 0.165, 3e-5 0.123, 1e-5 0.152; ect (the distill stage itself, `dvc exp run -S method.name=flow_matching -S
# distill.method=ect -S distill.lr=...`): 1e-3 0.255, 3e-4 0.195, 1e-4 0.317, 3e-5 0.467. Tuning
# trains over wider intervals than one teacher step and wants the larger rate.
DISTILL_LR_FACTOR = {"cd": 0.03, "ect": 0.3}


def distill_lr(setting: Any, train_lr: float, method: str) -> float:
    """distill.lr resolved: auto is the teacher's resolved train lr times DISTILL_LR_FACTOR[method]."""
    return float(train_lr) * DISTILL_LR_FACTOR[method] if setting == "auto" else float(setting)


def fid_n(eval_fid_n: Any, data: Mapping[str, Any]) -> Optional[int]:
    """eval.fid_n resolved: the image class's default, at most the test and reference sizes; None for points."""
    if data["kind"] != "images":
        return None
    n = _pick(eval_fid_n, image_defaults(tuple(data["shape"])).fid_n)
    return int(min(n, data["n_test"], data["n_reference"])) if eval_fid_n == "auto" else int(n)


def sample_sizes(sample_n: Any, batch_size: Any, eval_fid_n: Any, data: Mapping[str, Any],
                 fid_seeds: int = 1) -> tuple[int, int]:
    """(sample.n, sample.batch_size) resolved: points 10,000 in one batch; images eval.fid_seeds x eval.fid_n
    samples (a set of eval.fid_n per FID) in the image class's batch. ValueError when a set sample.n is short of
    eval.fid_seeds sets."""
    if data["kind"] != "images":
        return int(_pick(sample_n, POINT_SIZES)), int(_pick(batch_size, POINT_SIZES))
    d = image_defaults(tuple(data["shape"]))
    need = fid_seeds * fid_n(eval_fid_n, data)
    n = int(_pick(sample_n, need))
    if fid_seeds > 1 and n < need:
        raise ValueError(f"sample.n ({n}) must be >= eval.fid_seeds x eval.fid_n ({need}): each FID set has "
                         f"eval.fid_n samples of its own (or leave sample.n: auto)")
    return n, int(_pick(batch_size, d.sample_batch_size))


def sample_classes(setting: Any, n: int, num_classes: int) -> "torch.Tensor":
    """The 0-based class of each of n samples of a class-conditional model (sample.classes), (n,) int64: 'auto'
    cycles through every class (sample i gets i mod K), a list is cycled the same way. Sample i's class depends
    on i alone, so it does not change with sample.batch_size or sample.devices."""
    import torch

    chosen = list(range(num_classes)) if setting == "auto" else [int(c) for c in setting]
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"sample.classes {bad} are not classes of this data (0..{num_classes - 1})")
    return torch.tensor(chosen, dtype=torch.int64)[torch.arange(n) % len(chosen)]


# The samplers that step through Tweedie's x0_hat, where clipping it to the pixel range is the reference codes' habit.
CLIPPED_SAMPLERS = ("ancestral", "ddim")


def clip_denoised(setting: Any, sampler: str, model_kind: str, data: Mapping[str, Any]) -> bool:
    """sample.clip_denoised resolved: 'auto' clips x0_hat for images under the ancestral and DDIM samplers of a
    score model (Ho et al. 2020's reference sampler, diffusers' DDIMScheduler), never for points, whose data
    have no range. A learned kernel (sohl_dickstein) has no x0_hat to clip."""
    if setting != "auto":
        return bool(setting)
    return data["kind"] == "images" and sampler in CLIPPED_SAMPLERS and model_kind == "score"


def scaling_for(process_kind: str, scaling: str) -> str:
    """data.scaling resolved: [0, 1] where the method's paper uses it (NCSN, NCSNv2 and score_sde's VE: Song &
    Ermon 2019, 2020; Song et al. 2021, appendix), [-1, 1] otherwise (DDPM, VP, sub-VP, OU)."""
    if scaling != "auto":
        return scaling
    return "zero_one" if process_kind in ("noise_scales", "ve") else "minus_one_one"


def inpaint_mask(setting: str, data: Mapping[str, Any]) -> str:
    """sample.inpaint.mask resolved: 'auto' is the centre box for images (the issue's benchmark mask) and 'first'
    (coordinate 0 known) for points."""
    if setting != "auto":
        return setting
    return "box" if data["kind"] == "images" else "first"


# MCG's step alpha (pipeline.inpaint.mcg) on 'auto': points the value the 2-D mixture oracle shows unbiased
# (tests/test_inpaint.py, 500 PC steps; 0.1 is biased there); images 0.1, a step on the scale of the pixel range
# per grid step, not tuned (benchmarks/controllable.py measures it on digits; the MCG code's 0.5 is for 256 x 256).
MCG_ALPHA = {"points": 0.01, "images": 0.1}


def mcg_alpha(setting: Any, data: Mapping[str, Any]) -> float:
    """sample.inpaint.alpha resolved per data kind (MCG_ALPHA)."""
    return float(_pick(setting, MCG_ALPHA[data["kind"]]))


# DPS's step zeta (pipeline.inverse.dps) on 'auto'. Its normalised step zeta / ||r|| grad ||r||^2 keeps its length as
# the residual shrinks, so the final |A x - y| oscillates at a level that grows with zeta: on the 2-D mixture oracle
# (python -m benchmarks.inverse --only oracle: 500 PC steps, sigma_y 0.5, where an exact draw has |A x - y| 0.40)
# zeta 0.05 gives 0.10 and KS 0.018, 0.2 gives 0.39 and KS 0.051, 1.0 gives 1.99 and KS 0.127. Images 0.5, the
# middle of the DPS paper's 0.1-1.0 at 256 x 256, not tuned here.
DPS_ZETA = {"points": 0.05, "images": 0.5}


def dps_zeta(setting: Any, data: Mapping[str, Any]) -> float:
    """sample.inverse.zeta (sample.inpaint.zeta) resolved per data kind (DPS_ZETA)."""
    return float(_pick(setting, DPS_ZETA[data["kind"]]))


def method_options(method: str, p: Any, data: Mapping[str, Any]) -> dict:
    """The options of one inverse-problem method from sample.inpaint / sample.inverse: RePaint's jump and
    resamples, MCG's alpha, DPS's zeta (resolved per data kind)."""
    return {"repaint": lambda: {"jump": p.jump, "resamples": p.resamples},
            "mcg": lambda: {"alpha": mcg_alpha(p.alpha, data)},
            "dps": lambda: {"zeta": dps_zeta(p.zeta, data)}}.get(method, dict)()
