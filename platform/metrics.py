"""Metrics computed from a whole split's gathered outputs (never averaged over batches)."""

from __future__ import annotations

import numpy as np


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, cross-entropy, macro and per-class one-vs-rest ROC AUC. probs (N, K), labels (N,)."""
    from sklearn.metrics import roc_auc_score  # on first use: see plots.pyplot

    metrics = {
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
    }
    aucs = []
    for k, name in enumerate(classes):
        positives = labels == k
        # AUC is undefined when a class is absent (or alone) in the split; say so with NaN.
        auc = roc_auc_score(positives, probs[:, k]) if 0 < positives.sum() < len(labels) else float("nan")
        metrics[f"auc_{name}"] = float(auc)
        aucs.append(auc)
    metrics["auc_macro"] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    return metrics


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """ROC AUC, PR AUC, recall at a 1% false-positive rate, and precision, recall and F1 at a
    decision threshold.

    scores (N,) probabilities of the positive class, labels (N,) 0/1. ``threshold=None`` tunes
    it on these very outputs (the validation split) for F1, as one would before deploying a
    finder, and reports it so it can be reused; the test split is scored at the one chosen on val.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    labels = labels.astype(np.int64)
    if not 0 < labels.sum() < len(labels):
        nan = float("nan")
        return {"roc_auc": nan, "pr_auc": nan, "recall_at_1pct_fpr": nan, "precision": nan, "recall": nan, "f1": nan,
                "threshold": nan if threshold is None else float(threshold)}
    if threshold is None:
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
        precision, recall, f1, threshold = precision[best], recall[best], f1[best], thresholds[best]
    else:
        found = scores >= threshold
        true_positives = float((found & (labels == 1)).sum())
        precision = true_positives / found.sum() if found.any() else 0.0
        recall = true_positives / (labels == 1).sum()
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    # A survey's finder is judged by the lenses it finds while its false positives stay few among
    # millions of galaxies: the ROC curve's best recall at no more than 1% of the non-lenses.
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "recall_at_1pct_fpr": float(true_positive_rate[false_positive_rate <= 0.01].max()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "threshold": float(threshold),
    }


# Image restoration (super-resolution). Images are (N, C, H, W) arrays in [0, 1], the data
# range PSNR and SSIM assume; each function returns one value per image (N,), and a split's
# figure is their mean, as super-resolution papers report it.

MSE_FLOOR = 1e-10  # identical images: PSNR capped at 100 dB rather than inf, so means stay finite
SSIM_SIGMA = 1.5  # Wang et al. (2004): an 11 x 11 Gaussian window of sigma 1.5 ...
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # ... and these stabilising constants


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) arrays of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def mse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared error of each image (N,)."""
    pred, target = _pair(pred, target)
    return ((pred - target) ** 2).mean(axis=(1, 2, 3))


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio of each image in dB (N,): 10 log10(range^2 / MSE), at most 100 dB."""
    return 10 * np.log10(data_range**2 / np.maximum(mse(pred, target), MSE_FLOOR * data_range**2))


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity of each image (N,), Wang et al. (2004), averaged over its channels.

    Local means, variances and covariance under an 11 x 11 Gaussian window (sigma 1.5),
    population (not sample) moments, C1 = (0.01 L)^2, C2 = (0.03 L)^2, and the SSIM map
    averaged over the pixels whose window lies inside the image: the reference form, which
    skimage gives with ``gaussian_weights=True, use_sample_covariance=False``.
    """
    from scipy.ndimage import gaussian_filter

    x, y = _pair(pred, target)
    if min(x.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} pixels a side, got {x.shape[-2:]}")

    def window_mean(a: np.ndarray) -> np.ndarray:  # (N, C, H, W), spatial axes only
        # truncate puts the kernel's radius at int(3.5 * 1.5 + 0.5) = 5 pixels: the 11 x 11 window.
        return gaussian_filter(a, sigma=(0, 0, SSIM_SIGMA, SSIM_SIGMA), truncate=3.5)

    mu_x, mu_y = window_mean(x), window_mean(y)
    var_x = window_mean(x * x) - mu_x**2
    var_y = window_mean(y * y) - mu_y**2
    cov = window_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    r = SSIM_RADIUS  # the border's windows would reach past the image (padding would invent pixels)
    return ssim_map[..., r:-r, r:-r].mean(axis=(1, 2, 3))
