"""What differs between the kinds of data, one object per kind behind one interface (docs/design.md, "Stages and their contracts").

Points are float32 (N, D) arrays; images uint8 pixels (N, C, H, W), seen by the model through the run's scaling
(pipeline.pixels). A kind holds the conversion to and from model space, the unit of distances, every figure of the
sample and evaluate stages that differs by kind, the nearest-neighbour check and the metrics of generated sets.
`kind_of(record)` gives the object of a data record; the stages ask it and never branch on the kind. Nothing here
reads a file by its path: the stages own their paths and hand the metrics a `Files` of readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline import defaults, pixels, plots
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataParams, EvalParams
    from pipeline.gmm import GaussianMixture

# The metric libraries (clean-fid, POT, torchvision) are imported inside the methods that use them: noise_scales and
# sample convert data and draw figures only, and start without them.

# The memorisation figure: this many samples, each with this many nearest training examples.
NEIGHBOUR_SAMPLES, NEIGHBOURS = 8, 8
# Images in the grid of generated samples, and items shown side by side in the figures of inpainting and editing.
GRID_IMAGES, SIDE_BY_SIDE = 64, 8
# The pixel level shown where inpainting generates (mid-grey).
HIDDEN_PIXEL = 128
# The clean-fid protocol of the reference features, reported with every image metric.
FID_PROTOCOL = ("fid_floor", "kid_floor", "precision_floor", "recall_floor", "density_floor", "coverage_floor",
                "prdc_k", "fid_n", "fid_against", "fid_mode", "fid_reference", "fid_weights", "fid_impl")
# The floors on the domain classifier's features (metrics/classifier.json), reported with its metrics.
DOMAIN_FLOORS = ("fid_domain_floor", "precision_domain_floor", "recall_domain_floor", "density_domain_floor",
                 "coverage_domain_floor")


class Files:
    """Stored inputs of the metrics by name, each read once, on first use: readers maps a name to (read, path).

    Names read here: train, test, reference, {train,test,reference}_labels (arrays); fid_reference,
    domain_reference (npz dicts); fid_metrics, classifier_metrics (records); classifier (its torch file)."""

    def __init__(self, readers: Mapping[str, tuple[Callable[[Path], Any], Path]]):
        self.readers, self.read = dict(readers), {}

    def __getitem__(self, name: str) -> Any:
        if name not in self.read:
            reader, path = self.readers[name]
            self.read[name] = reader(path)
        return self.read[name]


@dataclass(frozen=True)
class Evaluation:
    """What the metrics of a kind take besides the outputs: the stored inputs, eval.*, the device, the data's exact
    mixture (data.name gmm) or None, and the path of the metrics figure."""

    files: Files
    settings: EvalParams
    device: str
    mixture: Optional[GaussianMixture]
    figure: Path


def known_mixture(data: DataParams) -> Optional[GaussianMixture]:
    """The exact mixture of data.name gmm (its density and scores are known), None for any other data."""
    from pipeline.gmm import GaussianMixture

    if data.name != "gmm":
        return None
    g = data.gmm
    return GaussianMixture.from_params(g.weights, g.means, g.covs)


def rms(a: np.ndarray, b: np.ndarray, unit: float) -> np.ndarray:
    """pipeline.edit.rms_distance (N,) of stored outputs a, b (N, ...), in `unit`s (255: pixels in [0, 1])."""
    from pipeline.edit import rms_distance

    as_float = lambda v: torch.from_numpy(v.astype(np.float64) / unit)  # noqa: E731
    return rms_distance(as_float(a), as_float(b)).numpy()


class DataKind:
    """The interface, and what both kinds share: the metrics of the tasks (inpaint, edit, interpolate) in the
    kind's unit. Subclasses: Points, Images."""

    name: ClassVar[str]
    unit: ClassVar[float]  # distances are reported in units of this many stored levels (pixels: [0, 1])

    def __init__(self, record: dict, scaling: Optional[str] = None):
        self.record, self.scaling = record, scaling

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape D of one item (record["shape"])."""
        return tuple(self.record["shape"])

    # ------------------------------------------------------------------ model space

    def for_process(self, process_kind: str, setting: str) -> DataKind:
        """This kind with the scaling the noise_scales stage chooses for the process (data.scaling `setting`)."""
        return self

    def noise_record(self) -> dict:
        """What the noise_scales record keeps of the kind for the later stages."""
        return {}

    def to_model(self, data: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stored items (N, *D) as float32 model-space values on `device`."""
        raise NotImplementedError

    def to_output(self, x: torch.Tensor) -> np.ndarray:
        """Model-space values (N, *D) as stored, on the CPU."""
        raise NotImplementedError

    def value_range(self) -> tuple[float, float]:
        """(low, high) of the data in model space, where x0_hat is clipped."""
        raise ValueError(f"{self.name} have no range to clip x0_hat to (sample.clip_denoised is for images)")

    def output_range(self) -> Optional[tuple[float, float]]:
        """(low, high) in model space that to_output clips to, or None where it keeps every value (points)."""
        return None

    def likelihood_input(self, held_out: np.ndarray) -> torch.Tensor:
        """Held-out items (N, *D) as pipeline.likelihood.model_likelihoods takes them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training

    # Whether the train stage logs a small grid of samples with each held-out evaluation (train.eval_every).
    shows_samples: ClassVar[bool] = False

    def decoder(self) -> Optional[dict]:
        """The discrete decoder of the ELBO's last step (pipeline.pixels.discrete_decoder), for 8-bit data."""
        return None

    def batch_transform(self, dequantize: bool, hflip: bool) -> Optional[Callable]:
        """What each training batch goes through (data.dequantize, data.hflip), or None: used as drawn."""
        return None

    def augmentation(self, dequantize: bool, hflip: bool) -> Optional[dict]:
        """The augmentation a checkpoint must match to be resumed (None: there is none)."""
        return None

    def train_record(self, resolved: dict, arch: str) -> dict:
        """What metrics/train.json adds for this kind (the 2-D record keeps its keys; images name their sizes)."""
        return {}

    # ------------------------------------------------------------------ figures of the sample stage

    def samples_figure(self, path: Path, x: np.ndarray, held_out: np.ndarray, title: str) -> None:
        """Generated items x (N, *D), with the held-out items (M, *D) where the kind shows them."""
        raise NotImplementedError

    def trajectory_figure(self, path: Path, trajectory: Sequence[tuple[float, torch.Tensor]], title: str) -> None:
        """The first items of a batch (K, *D), in model space on the CPU, at each recorded time t."""
        raise NotImplementedError

    def hidden_value(self) -> float:
        """The model-space value shown where nothing is measured (a mask's hidden entries)."""
        return 0.0

    def measurement_view(self, operator: Any, y: torch.Tensor) -> np.ndarray:
        """The measurements y (n, *K) as the eye sees them, stored like items (n, *D): grey, low-resolution,
        blurred, or the known part with the rest at hidden_value (pipeline.inverse.Operator.display)."""
        return self.to_output(operator.display(y, self.hidden_value()))

    def inverse_figure(self, path: Path, known: np.ndarray, shown: np.ndarray, methods: Sequence[str], x: np.ndarray,
                       nfes: Mapping[str, int], title: str) -> None:
        """An inverse problem side by side: the originals known (n, *D), the measurements as the eye sees them
        shown (n, *D) (grey, low-resolution, blurred), each method's solutions x (M, n, *D) and its nfe."""
        raise NotImplementedError

    def interpolation_figure(self, path: Path, x: np.ndarray, alpha: np.ndarray, held_out: np.ndarray,
                             title: str) -> None:
        """Interpolation rows x (P, K, *D) at the K fractions alpha, over the held-out items (M, *D)."""
        raise NotImplementedError

    def edit_figure(self, path: Path, inputs: np.ndarray, times: Sequence[float], x: np.ndarray, title: str) -> None:
        """SDEdit side by side: the inputs (n, *D) and their edits x (T, n, *D) from each t0 of times."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the memorisation check

    def nearest(self, items: np.ndarray, train: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
        """Indices (S, k) of the k training items (N, *D) nearest in L2 to each of items (S, *D), nearest first."""
        raise NotImplementedError

    def neighbours_figure(self, path: Path, items: np.ndarray, train: np.ndarray, noun: str) -> None:
        """Each of items (S, *D) ('sample's or 'output's) with its NEIGHBOURS nearest training items (N, *D)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ metrics

    def generated_metrics(self, x: np.ndarray, requested: Optional[np.ndarray], ev: Evaluation) -> dict:
        """The metrics of generated items x (N, *D), with each one's requested class (N,) for a conditional model;
        draws the metrics figure."""
        raise NotImplementedError

    def inpaint_quality(self, x: np.ndarray, mask: np.ndarray, names: Sequence[str], ev: Evaluation) -> dict:
        """The kind's own metrics of each named inpainting method's completions x (M, n, *D); draws the figure."""
        raise NotImplementedError

    def metric_n(self, ev: Evaluation) -> int:
        """How many generated items the metrics compare with as many held-out ones (equal N each side)."""
        raise NotImplementedError

    def memorisation(self, x: np.ndarray, ev: Evaluation) -> dict:
        """The fraction of the first metric_n samples closer to a training item than all but MEMORISED_QUANTILE
        of as many test items are, and its floor, the reference split's (pipeline.metrics.fidelity.memorisation;
        the distance is the neighbours figure's: coordinates, or pixels as stored)."""
        from pipeline.metrics.fidelity import MEMORISED_QUANTILE, memorisation

        n, files = min(len(x), self.metric_n(ev)), ev.files
        return memorisation(x[:n], files["test"][:n], files["reference"][:n], files["train"], MEMORISED_QUANTILE,
                            ev.device)

    def edit_quality(self, x: np.ndarray, names: Sequence[str], ev: Evaluation) -> tuple[dict, dict]:
        """The kind's own metrics of each named edit set x (T, n, *D) and the curves they add to the figure."""
        return {}, {}

    def inpaint_metrics(self, x: np.ndarray, known: np.ndarray, mask: np.ndarray, names: Sequence[str],
                        ev: Evaluation) -> dict:
        """Per method: the RMS error of the generated part (mask 0) of x (M, n, *D) against the originals known
        (n, *D) in the kind's unit, then inpaint_quality."""
        hidden = mask == 0
        metrics: dict = {}
        for name, out in zip(names, x):
            diff = (out.astype(np.float64) - known.astype(np.float64)) / self.unit
            metrics[f"rmse_{name}"] = float(np.sqrt(np.mean(diff[hidden] ** 2)))  # over the generated entries only
        return metrics | self.inpaint_quality(x, mask, names, ev)

    def model_span(self) -> float:
        """How many model-space units make the kind's unit (points 1; images the pixel range in model space)."""
        return 1.0

    def inverse_metrics(self, x: np.ndarray, known: np.ndarray, y: np.ndarray, spec: Mapping[str, Any],
                        mask: Optional[np.ndarray], names: Sequence[str], ev: Evaluation) -> dict:
        """Per method, in the kind's unit: consistency_<m>, the RMS over the measured entries of A x - y per item
        (0 for an exact projection onto a noiseless y, about the noise for a posterior draw), averaged, and
        consistency_max_<m>, the largest |A x - y| of any entry of any item; rmse_<m>,
        the RMS distance of x (M, n, *D) to the originals known (n, *D); then inverse_quality. The measurement's
        noise in the same unit: measurement_noise."""
        from pipeline.inverse import Mask, operator_from

        op = operator_from(spec, self.shape, None if mask is None else torch.from_numpy(mask))
        y_model = torch.from_numpy(y).to(torch.float64)
        span = self.model_span()
        metrics: dict = {"measurement_noise": float(spec.get("noise", 0.0)) / span}
        for name, out in zip(names, x):
            r = op(self.to_model(out).to(torch.float64)) - y_model
            squares = r.pow(2).flatten(1)
            if isinstance(op, Mask):  # the measured entries of a mask are its known ones
                known_entries = op.known.expand(r.shape).flatten(1)
                per_item = (squares * known_entries).sum(1) / known_entries.sum(1)
                largest = (r.abs().flatten(1) * known_entries).max()
            else:
                per_item, largest = squares.mean(1), r.abs().max()
            metrics[f"consistency_{name}"] = float(per_item.sqrt().mean()) / span
            metrics[f"consistency_max_{name}"] = float(largest) / span
            metrics[f"rmse_{name}"] = float(rms(out, known, self.unit).mean())
        return metrics | self.inverse_quality(x, y_model, op, spec, names, ev)

    def inverse_quality(self, x: np.ndarray, y: torch.Tensor, op: Any, spec: Mapping[str, Any],
                        names: Sequence[str], ev: Evaluation) -> dict:
        """The kind's own metrics of each named inverse-problem solution set x (M, n, *D); draws the figure."""
        raise NotImplementedError

    def edit_metrics(self, x: np.ndarray, inputs: np.ndarray, times: Sequence[float], ev: Evaluation) -> dict:
        """Per t0 of times: the mean RMS distance of the edits x (T, n, *D) from their inputs (n, *D), then
        edit_quality; a figure of each against t0."""
        names = [f"t0_{t:g}" for t in times]
        metrics = {f"distance_{name}": float(rms(out, inputs, self.unit).mean()) for name, out in zip(names, x)}
        found, curves = self.edit_quality(x, names, ev)
        plots.metric_curves(ev.figure, times, {"RMS distance from the input": [metrics[f"distance_{name}"]
                                                                               for name in names]} | curves,
                            "t0 (fraction of the sampling walk)", "SDEdit")
        return metrics | found

    def interpolate_metrics(self, x: np.ndarray, scheme: Any, ev: Evaluation) -> dict:
        """How evenly each row of x (P, K, *D) moves: the RMS distance between consecutive frames, averaged over
        rows, and its largest value over the even share of the endpoints' distance (1: evenly spaced frames)."""
        p, k = x.shape[:2]
        steps = np.stack([rms(x[:, j + 1], x[:, j], self.unit) for j in range(k - 1)], axis=1)  # (P, K - 1)
        ends = rms(x[:, -1], x[:, 0], self.unit)  # (P,)
        metrics = {"endpoint_distance": float(ends.mean()), "frame_distance": float(steps.mean()),
                   "max_step_ratio": float((steps.max(1) / np.maximum(ends / (k - 1), 1e-12)).mean())}
        plots.metric_curves(ev.figure, list(range(1, k)), {"RMS distance to the previous frame":
                                                           steps.mean(0).tolist()},
                            "frame", f"{scheme} interpolation: {p} rows")
        return metrics


class Points(DataKind):
    """Float32 points (N, D): the model sees them as they are."""

    name, unit = "points", 1.0

    def to_model(self, data: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.from_numpy(data).float().to(device)

    def to_output(self, x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

    def likelihood_input(self, held_out: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(held_out.astype(np.float64))  # the likelihoods are computed in float64

    def samples_figure(self, path: Path, x: np.ndarray, held_out: np.ndarray, title: str) -> None:
        plots.scatter_samples(path, x, held_out[: len(x)], title)

    def trajectory_figure(self, path: Path, trajectory: Sequence[tuple[float, torch.Tensor]], title: str) -> None:
        plots.point_trajectory(path, [(t, v.numpy()) for t, v in trajectory], f"{title}: x at {len(trajectory)} times")

    def inverse_figure(self, path: Path, known: np.ndarray, shown: np.ndarray, methods: Sequence[str], x: np.ndarray,
                       nfes: Mapping[str, int], title: str) -> None:
        plots.point_panels(path, [(f"{name} (nfe {nfes[name]})", xm) for name, xm in zip(methods, x)], known,
                           f"{title}: solutions (orange) over the held-out items (grey)")

    def interpolation_figure(self, path: Path, x: np.ndarray, alpha: np.ndarray, held_out: np.ndarray,
                             title: str) -> None:
        plots.point_paths(path, x, held_out, f"{title}: {x.shape[0]} paths of {x.shape[1]} frames")

    def edit_figure(self, path: Path, inputs: np.ndarray, times: Sequence[float], x: np.ndarray, title: str) -> None:
        plots.point_panels(path, [(f"t0 = {t0:g}", xt) for t0, xt in zip(times, x)], inputs,
                           f"{title}: edits (orange) of the held-out items (grey)")

    def nearest(self, items: np.ndarray, train: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
        from pipeline.metrics.images import nearest_training

        return nearest_training(items.astype(np.float32), train.astype(np.float32), k)

    def neighbours_figure(self, path: Path, items: np.ndarray, train: np.ndarray, noun: str) -> None:
        idx = self.nearest(items, train)
        plots.nearest_points(path, items.astype(np.float64), train[idx].astype(np.float64), train.astype(np.float64),
                             f"{noun}s (orange) and their nearest training points (blue)")

    def metric_n(self, ev: Evaluation) -> int:
        return defaults.POINT_SIZES if ev.settings.n == "auto" else ev.settings.n

    def generated_metrics(self, x: np.ndarray, requested: Optional[np.ndarray], ev: Evaluation) -> dict:
        """Chamfer and earth mover's distances against the test split, each with its floor (the reference split);
        on gmm data the mixture's moment errors; with classes the accuracy of the requested ones."""
        from pipeline.gmm import mixture_metrics
        from pipeline.metrics import pointcloud_metrics

        e, files = ev.settings, ev.files
        n = self.metric_n(ev)
        test, reference = files["test"].astype(np.float64), files["reference"].astype(np.float64)
        if len(x) < n:
            raise ValueError(f"samples.npz holds {len(x)} points but eval.n is {n}; re-run sample")
        gen = x.astype(np.float64)
        metrics = pointcloud_metrics(gen[:n].reshape(n, -1), test[:n].reshape(n, -1), reference[:n].reshape(n, -1),
                                     cloud_size=e.cloud_size, emd_n=e.emd_n)
        if ev.mixture is not None:
            metrics.update(mixture_metrics(ev.mixture, torch.from_numpy(gen[:n].reshape(n, -1)),
                                           torch.from_numpy(test[:n].reshape(n, -1))))
        plots.density_comparison(ev.figure, gen[:n], test[:n],
                                 f"cd {metrics['cd']:.4f} (floor {metrics['cd_floor']:.4f}), "
                                 f"emd {metrics['emd']:.4f} (floor {metrics['emd_floor']:.4f})")
        if requested is not None:
            metrics["cond_accuracy"] = self.cond_accuracy(x[: len(requested)], requested, ev)
        return metrics

    def cond_accuracy(self, x: np.ndarray, requested: np.ndarray, ev: Evaluation) -> float:
        """The class accuracy of guided points x (N, D): the Bayes classifier of the exact mixture where there is
        one (classes are its components), a nearest-neighbour classifier of the labelled training points else."""
        from pipeline.metrics.conditional import cond_accuracy, mixture_class_predictions, point_class_predictions

        if ev.mixture is not None:
            predicted = mixture_class_predictions(ev.mixture, x.astype(np.float64))
        else:
            predicted = point_class_predictions(ev.files["train"], ev.files["train_labels"], x)
        return cond_accuracy(predicted, requested)

    def inpaint_quality(self, x: np.ndarray, mask: np.ndarray, names: Sequence[str], ev: Evaluation) -> dict:
        """With the exact mixture and one hidden coordinate, the same for every item: the Kolmogorov-Smirnov
        statistic of the probability-integral transform F(x_u | x_K) under the exact conditional (0 for an exact
        inpainter); otherwise the chamfer distance of the completions to the reference split."""
        from scipy import stats

        from pipeline.inpaint import gmm_conditional_cdf

        if ev.mixture is not None and (mask == mask[:1]).all() and int((mask[0] == 0).sum()) == 1:
            pits = {name: gmm_conditional_cdf(ev.mixture, torch.from_numpy(out.astype(np.float64)),
                                              torch.from_numpy(mask[0])).numpy() for name, out in zip(names, x)}
            found = {f"ks_{name}": float(stats.kstest(u, "uniform").statistic) for name, u in pits.items()}
            # the statistic n exact draws exceed with probability 5 %
            found["ks_critical"] = float(stats.kstwo.ppf(1.0 - 0.05, len(x[0])))
            plots.pit_histograms(ev.figure, pits, {name: found[f"ks_{name}"] for name in names},
                                 "PIT of the generated coordinate under the exact conditional (flat = exact)")
            return found
        return self.cloud_quality(x, names, ev)

    def cloud_quality(self, x: np.ndarray, names: Sequence[str], ev: Evaluation) -> dict:
        """The chamfer distance of each named output set x (M, n, D) to the reference split; the figure: its bars."""
        from pipeline.metrics.pointcloud import chamfer_clouds

        reference = ev.files["reference"].astype(np.float64)
        found = {f"cd_{name}": chamfer_clouds(out.astype(np.float64), reference[: len(out)], ev.settings.cloud_size)
                 for name, out in zip(names, x)}
        plots.metric_bars(ev.figure, {name: found[f"cd_{name}"] for name in names}, {})
        return found

    def inverse_quality(self, x: np.ndarray, y: torch.Tensor, op: Any, spec: Mapping[str, Any],
                        names: Sequence[str], ev: Evaluation) -> dict:
        """With the exact mixture and a matrix with a null space: the Kolmogorov-Smirnov statistic of the
        probability-integral transform of each solution's coordinate along the null space under the exact
        posterior (pipeline.inverse.gmm_posterior_cdf; 0 for an exact solver) and the 5 % critical value; a mask
        is judged as inpainting is; otherwise the chamfer distance to the reference split."""
        from scipy import stats

        from pipeline.inverse import Mask, Matrix, gmm_posterior_cdf

        if isinstance(op, Mask):
            return self.inpaint_quality(x, op.mask.numpy(), names, ev)
        if ev.mixture is None or not isinstance(op, Matrix) or op.matrix.shape[0] >= op.matrix.shape[1]:
            return self.cloud_quality(x, names, ev)
        direction, noise = op.null_direction(), float(spec.get("noise", 0.0))
        pits = {name: gmm_posterior_cdf(ev.mixture, op.matrix, y, noise, torch.from_numpy(out.astype(np.float64)),
                                        direction).numpy() for name, out in zip(names, x)}
        found = {f"ks_{name}": float(stats.kstest(u, "uniform").statistic) for name, u in pits.items()}
        found["ks_critical"] = float(stats.kstwo.ppf(1.0 - 0.05, len(x[0])))
        plots.pit_histograms(ev.figure, pits, {name: found[f"ks_{name}"] for name in names},
                             "PIT along the unmeasured direction under the exact posterior (flat = exact)")
        return found


class Images(DataKind):
    """uint8 pixels (N, C, H, W), in model space through the run's scaling (pipeline.pixels): what a PNG holds and
    what FID sees. The record names the classes (num_classes, classes)."""

    name, unit = "images", 255.0

    def for_process(self, process_kind: str, setting: str) -> DataKind:
        return Images(self.record, defaults.scaling_for(process_kind, setting))

    def noise_record(self) -> dict:
        return {"scaling": self.scaling}

    def to_model(self, data: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        return pixels.to_model(torch.from_numpy(data), self.scaling).to(device)

    def to_output(self, x: torch.Tensor) -> np.ndarray:
        return pixels.to_pixels(x, self.scaling).cpu().numpy()

    def value_range(self) -> tuple[float, float]:
        return pixels.pixel_range(self.scaling)

    output_range = value_range  # to_pixels rounds, then clips to the pixel levels' range

    shows_samples = True

    def decoder(self) -> Optional[dict]:
        return pixels.discrete_decoder(self.scaling)

    def batch_transform(self, dequantize: bool, hflip: bool) -> Optional[Callable]:
        return pixels.image_batches(self.scaling, dequantize=dequantize, hflip=hflip)

    def augmentation(self, dequantize: bool, hflip: bool) -> Optional[dict]:
        return {"dequantize": dequantize, "hflip": hflip}

    def train_record(self, resolved: dict, arch: str) -> dict:
        return {"batch_size": resolved["batch_size"], "lr": resolved["lr"], "arch": arch,
                "precision": resolved["precision"], "lr_decay": resolved["lr_decay"]}

    def likelihood_input(self, held_out: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(held_out)  # pixels: the likelihoods dequantise them with the scaling

    def samples_figure(self, path: Path, x: np.ndarray, held_out: np.ndarray, title: str) -> None:
        plots.image_grid(path, x[:GRID_IMAGES], title)

    def trajectory_figure(self, path: Path, trajectory: Sequence[tuple[float, torch.Tensor]], title: str) -> None:
        frames = [(t, self.to_output(v)) for t, v in trajectory]
        plots.image_trajectory(path, frames, f"{title}: x at {len(frames)} times")

    def hidden_value(self) -> float:
        return float(self.to_model(np.array([HIDDEN_PIXEL], np.uint8))[0])

    def inverse_figure(self, path: Path, known: np.ndarray, shown: np.ndarray, methods: Sequence[str], x: np.ndarray,
                       nfes: Mapping[str, int], title: str) -> None:
        rows = slice(0, SIDE_BY_SIDE)
        plots.image_columns(path, [("original", known[rows]), ("measurement", shown[rows])]
                            + [(name, xm[rows]) for name, xm in zip(methods, x)], title)

    def interpolation_figure(self, path: Path, x: np.ndarray, alpha: np.ndarray, held_out: np.ndarray,
                             title: str) -> None:
        plots.image_columns(path, [(f"{a:.2f}", x[:, k]) for k, a in enumerate(alpha)],
                            f"{title}: each row from sample 2j to 2j + 1")

    def edit_figure(self, path: Path, inputs: np.ndarray, times: Sequence[float], x: np.ndarray, title: str) -> None:
        shown = slice(0, SIDE_BY_SIDE)
        plots.image_columns(path, [("input", inputs[shown])]
                            + [(f"t0 = {t0:g}", xt[shown]) for t0, xt in zip(times, x)], title)

    def nearest(self, items: np.ndarray, train: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
        from pipeline.metrics.images import nearest_training

        return nearest_training(items.astype(train.dtype), train, k)

    def neighbours_figure(self, path: Path, items: np.ndarray, train: np.ndarray, noun: str) -> None:
        article = "an" if noun[:1] in "aeiou" else "a"
        plots.nearest_neighbours(path, items, train[self.nearest(items, train)],
                                 f"each row: {article} {noun}, then its nearest training images (pixel L2)")

    def metric_n(self, ev: Evaluation) -> int:
        return len(ev.files["fid_reference"]["test"])

    def generated_metrics(self, x: np.ndarray, requested: Optional[np.ndarray], ev: Evaluation) -> dict:
        """FID and KID against the test split, and with a classifier (two classes or more) fid_domain, the class
        histogram and for a conditional model the accuracy of the requested classes and the per-class FID; then
        the FID protocol. The figure: the class histogram, or the samples without classes."""
        from pipeline.metrics.conditional import cond_accuracy, per_class_fid
        from pipeline.metrics.domain import load_classifier
        from pipeline.metrics.fid import fid_from_features, inception_features, kid_from_features
        from pipeline.metrics.images import feature_metrics, sample_features

        files = ev.files
        fid_ref, classifier_record = files["fid_reference"], files["classifier_metrics"]
        n, against = len(fid_ref["test"]), self.against(files)
        metrics: dict = {}
        if not classifier_record:  # one class: no classifier, FID and KID only
            feats = inception_features(x[:n], device=ev.device, progress=True)
            metrics.update(fid=fid_from_features(feats, fid_ref[against]),
                           kid=kid_from_features(feats, fid_ref[against], ev.settings.seed))
            plots.image_grid(ev.figure, x[:GRID_IMAGES], "samples (no classes: no class histogram)")
            return (metrics | self.fidelity(feats, None, files, ev.settings.seed)
                    | self.sample_sets(x, metrics["fid"], n, ev) | self.fid_protocol(files))
        classes = self.record["classes"]
        classifier = load_classifier(files["classifier"], device=ev.device)
        features = sample_features(x, n, classifier, device=ev.device, progress=True)
        found = feature_metrics(features, fid_ref, files["domain_reference"], num_classes=self.record["num_classes"],
                                seed=ev.settings.seed, against=against, domain_against="test")
        histogram = found.pop("class_histogram")
        metrics.update(found, **self.fidelity(features["inception"], features["domain"], files, ev.settings.seed),
                       **{k: classifier_record[k] for k in DOMAIN_FLOORS})
        metrics["class_histogram"] = dict(zip(classes, histogram))
        if requested is not None:  # a class-conditional model's guided samples
            metrics["cond_accuracy"] = cond_accuracy(features["predicted"], requested[:n])
            per_class = per_class_fid(features["inception"], requested[:n], fid_ref["test"], files["test_labels"][:n],
                                      fid_ref["reference"], files["reference_labels"][:n],
                                      num_classes=self.record["num_classes"])
            metrics.update({k: v for k, v in per_class.items() if not isinstance(v, list)})
            metrics["fid_per_class"] = dict(zip(classes, per_class["fid_per_class"]))
        plots.class_histogram(ev.figure, histogram, classifier_record["test_class_histogram"], classes,
                              f"classes of the samples (classifier test accuracy "
                              f"{classifier_record['classifier_test_accuracy']:.3f})")
        return metrics | self.sample_sets(x, metrics["fid"], n, ev) | self.fid_protocol(files)

    @staticmethod
    def against(files: Files) -> str:
        """The split FID is computed against: eval.fid_against as the fid_reference stage recorded it."""
        return files["fid_metrics"].get("fid_against", "test")

    def fidelity(self, inception: np.ndarray, domain: Optional[np.ndarray], files: Files, seed: int) -> dict:
        """FID's bootstrap interval, and precision, recall, density and coverage on the Inception features against
        the split of FID (its first N: equal N each side) and, with a classifier, on its features against the test
        split: pipeline.metrics.fidelity."""
        from pipeline.metrics.fidelity import fid_bootstrap, prdc_metrics

        real = files["fid_reference"][self.against(files)]
        low, high = fid_bootstrap(inception, real, seed=seed)
        found = {"fid_ci_low": low, "fid_ci_high": high, **prdc_metrics(real[:len(inception)], inception)}
        if domain is not None:
            found |= prdc_metrics(files["domain_reference"]["test"], domain, "_domain")
        return found

    def sample_sets(self, x: np.ndarray, first_fid: float, n: int, ev: Evaluation) -> dict:
        """eval.fid_seeds K > 1: the FID of each of the K sets of n samples x[k n : (k + 1) n] against FID's split,
        the first set's given (every sample has its own seed, so each set is a draw with seeds of its own), and
        their mean, minimum and spread (pipeline.metrics.fidelity.fid_over_sets); {} for K = 1. The other metrics
        stay those of the first set."""
        from pipeline.metrics.fid import fid_from_features, inception_features
        from pipeline.metrics.fidelity import fid_over_sets

        k = ev.settings.fid_seeds
        if k == 1:
            return {}
        if len(x) < k * n:
            raise DataError(f"eval.fid_seeds: {k} sets of {n} samples need {k * n}, but outputs/samples.npz holds "
                            f"{len(x)}; re-run sample with sample.n: auto (or >= {k * n})")
        real = ev.files["fid_reference"][self.against(ev.files)]
        fids = [first_fid] + [fid_from_features(inception_features(x[i * n:(i + 1) * n], device=ev.device,
                                                                   progress=True), real) for i in range(1, k)]
        return fid_over_sets(fids)

    @staticmethod
    def fid_protocol(files: Files) -> dict:
        """The floors and protocol of the FID reference (metrics/fid_reference.json's record)."""
        floors = files["fid_metrics"]
        return {k: floors[k] for k in FID_PROTOCOL}

    def output_metrics(self, outputs: np.ndarray, names: Sequence[str], ev: Evaluation) -> dict:
        """FID and KID against the reference split (the outputs are made from test items, so the test split would
        flatter them) of each named output set (M, n, C, H, W), and fid_domain where there is a classifier. The FID
        is clean-fid's exactly, computed as fid_by_svd: one per set, each a 2,048-D sqrtm (~20 s) otherwise."""
        from pipeline.metrics.domain import classifier_features, load_classifier
        from pipeline.metrics.fid import fid_by_svd, frechet_distance, inception_features, kid_from_features

        files = ev.files
        fid_ref, classifier_record = files["fid_reference"], files["classifier_metrics"]
        n = len(fid_ref["reference"])
        classifier = load_classifier(files["classifier"], device=ev.device) if classifier_record else None
        metrics = {}
        for name, out in zip(names, outputs):
            if len(out) < n:
                raise ValueError(f"FID compares {n} images each side but there are only {len(out)} outputs; "
                                 f"re-run sample with sample.n >= eval.fid_n")
            feats = inception_features(out[:n], device=ev.device, progress=True)
            metrics[f"fid_{name}"] = fid_by_svd(feats, fid_ref["reference"])
            metrics[f"kid_{name}"] = kid_from_features(feats, fid_ref["reference"], ev.settings.seed)
            if classifier is not None:
                domain = classifier_features(classifier, out[:n], device=ev.device)
                metrics[f"fid_domain_{name}"] = frechet_distance(domain, files["domain_reference"]["reference"])
        if classifier_record:
            metrics["fid_domain_floor"] = classifier_record["fid_domain_floor"]
        return metrics | self.fid_protocol(files)

    def inpaint_quality(self, x: np.ndarray, mask: np.ndarray, names: Sequence[str], ev: Evaluation) -> dict:
        """output_metrics of each method's completions; the figure: each FID next to its floor."""
        found = self.output_metrics(x, names, ev)
        plots.metric_bars(ev.figure, {name: found[f"fid_{name}"] for name in names},
                          {name: found["fid_floor"] for name in names})
        return found

    def edit_quality(self, x: np.ndarray, names: Sequence[str], ev: Evaluation) -> tuple[dict, dict]:
        found = self.output_metrics(x, names, ev)
        return found, {"FID (against the reference split)": [found[f"fid_{name}"] for name in names]}

    def model_span(self) -> float:
        low, high = self.value_range()
        return high - low

    def inverse_quality(self, x: np.ndarray, y: torch.Tensor, op: Any, spec: Mapping[str, Any],
                        names: Sequence[str], ev: Evaluation) -> dict:
        """output_metrics of each method's solutions, and for colourisation the colourfulness (Hasler &
        Süsstrunk 2003) of each and of the reference split's first n images, so that grey-looking outputs show;
        the figure: each FID next to its floor."""
        from pipeline.metrics.images import colourfulness

        found = self.output_metrics(x, names, ev)
        if spec["operator"] == "colorize":
            found["colourfulness_reference"] = float(colourfulness(ev.files["reference"][: x.shape[1]]).mean())
            found |= {f"colourfulness_{name}": float(colourfulness(out).mean()) for name, out in zip(names, x)}
        plots.metric_bars(ev.figure, {name: found[f"fid_{name}"] for name in names},
                          {name: found["fid_floor"] for name in names})
        return found


KINDS: dict[str, type[DataKind]] = {"points": Points, "images": Images}


def kind_of(record: dict, scaling: Optional[str] = None) -> DataKind:
    """The kind of a data record (data/record.json: kind 'points' or 'images'); images in model space through
    `scaling` (the noise_scales record's; None before that stage chose it)."""
    return KINDS[record["kind"]](record, scaling)
