"""Image metrics against held-out data: FID/KID (clean-fid), fid_domain, precision/recall/density/coverage, the class
histogram, nearest neighbours.

Definitions: docs/design.md, "Metrics, defined once". Every distance is reported next to its floor, the
same distance between the reference split and the same test images at the same N, because FID is
biased upwards at small N and only comparable at equal N (Heusel et al. 2017; Parmar et al. 2022).
The test and reference features are computed once by their own cached stages (fid_reference,
classifier); an experiment only computes the features of its samples.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from pipeline.metrics.domain import class_histogram, classifier_features, predict
from pipeline.metrics.fid import fid_from_features, frechet_distance, inception_features, kid_from_features
from pipeline.metrics.fidelity import PRDC_K, prdc_metrics


def reference_metrics(real_feats: np.ndarray, reference_feats: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The floors: fid, kid, precision, recall, density and coverage of the reference split's N features (N, 2048)
    against the real split's (the test split's N, or every training image's; precision and the others on the
    first N of them, equal N each side)."""
    return {"fid_floor": fid_from_features(reference_feats, real_feats),
            "kid_floor": kid_from_features(reference_feats, real_feats, seed),
            **prdc_metrics(real_feats[:len(reference_feats)], reference_feats, "_floor"), "prdc_k": PRDC_K}


def sample_features(samples: np.ndarray, n: int, classifier: nn.Module, *, device="cpu",
                    progress: bool = False) -> dict[str, np.ndarray]:
    """The first n uint8 samples (N, C, H, W) seen by the metrics: Inception features (n, 2048), the domain
    classifier's features (n, F) and its predicted classes (n,)."""
    if len(samples) < n:
        raise ValueError(f"FID compares {n} images each side but there are only {len(samples)} samples; "
                         f"re-run sample with sample.n >= eval.fid_n")
    return {"inception": inception_features(samples[:n], device=device, progress=progress),
            "domain": classifier_features(classifier, samples[:n], device=device),
            "predicted": predict(classifier, samples[:n], device=device)}


def feature_metrics(features: Mapping[str, np.ndarray], fid_reference: Mapping[str, np.ndarray],
                    domain_reference: Mapping[str, np.ndarray], *, num_classes: int, seed: int = 0,
                    against: str = "test", domain_against: str | None = None) -> dict[str, float | list[float]]:
    """fid, kid of sample_features against the `against` split's Inception features ("test"; "train" with
    eval.fid_against: train; "reference" for samples made from test items: inpainting, editing), fid_domain against
    the `domain_against` split's classifier features (default: the same split), and the samples' class histogram."""
    return {"fid": fid_from_features(features["inception"], fid_reference[against]),
            "kid": kid_from_features(features["inception"], fid_reference[against], seed),
            "fid_domain": frechet_distance(features["domain"], domain_reference[domain_against or against]),
            "class_histogram": class_histogram(features["predicted"], num_classes)}


def sample_metrics(samples: np.ndarray, fid_reference: Mapping[str, np.ndarray], classifier: nn.Module,
                   domain_reference: Mapping[str, np.ndarray], *, num_classes: int, device="cpu", seed: int = 0,
                   progress: bool = False) -> dict[str, float | list[float]]:
    """fid, kid, fid_domain of uint8 samples (N, C, H, W) against the test features, and the samples' class
    histogram; N must equal the number of reference features (equal N, docs/design.md, "Metrics, defined once")."""
    features = sample_features(samples, len(fid_reference["test"]), classifier, device=device, progress=progress)
    return feature_metrics(features, fid_reference, domain_reference, num_classes=num_classes, seed=seed)


def nearest_training(samples: np.ndarray, train: np.ndarray, k: int = 8, block: int = 4096) -> np.ndarray:
    """Indices (S, k) of the k training images closest in pixel L2 to each sample (uint8 (S, C, H, W) and
    (N, C, H, W)): the memorisation check (a sample equal to a training image is copied, not generated)."""
    s = torch.from_numpy(samples.reshape(len(samples), -1).astype(np.float32))
    best_d = torch.full((len(s), 0), 0.0)
    best_i = torch.zeros((len(s), 0), dtype=torch.long)
    for start in range(0, len(train), block):
        t = torch.from_numpy(train[start:start + block].reshape(-1, s.shape[1]).astype(np.float32))
        d = torch.cdist(s, t)
        best_d = torch.cat([best_d, d], 1)
        best_i = torch.cat([best_i, torch.arange(start, start + len(t)).expand(len(s), -1)], 1)
        keep = torch.topk(best_d, min(k, best_d.shape[1]), largest=False, sorted=True).indices
        best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
    return best_i.numpy()


def colourfulness(images: np.ndarray) -> np.ndarray:
    """The colourfulness M of each RGB image (N, 3, H, W) uint8 (Hasler & Süsstrunk 2003, eq. 3 with their
    opponent channels rg = R - G, yb = (R + G) / 2 - B, in pixel levels): sqrt(s_rg^2 + s_yb^2) +
    0.3 sqrt(m_rg^2 + m_yb^2), s and m each channel's standard deviation and mean over the image; 0 for grey. (N,)"""
    x = np.asarray(images, np.float64)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"colourfulness needs RGB images (N, 3, H, W), got shape {x.shape}")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg, yb = (r - g).reshape(len(x), -1), (0.5 * (r + g) - b).reshape(len(x), -1)
    return np.hypot(rg.std(1), yb.std(1)) + 0.3 * np.hypot(rg.mean(1), yb.mean(1))
