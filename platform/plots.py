"""Figures that runs log to MLflow. Agg backend: workers have no display."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (workers have no display), imported on first use, as
    sklearn's curves are: only the process that draws pays for them (1.4 s on two cores): rank 0 of
    a run at its end, a sweep's driver for its summary figures. The other ranks, the trial
    processes of Train runs and every command that fails on bad input never import them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def roc_figure(probs: np.ndarray, labels: np.ndarray, classes: list[str]):
    from sklearn.metrics import roc_curve

    figure, ax = pyplot().subplots(figsize=(4.5, 4.5))
    for k, name in enumerate(classes):
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest)")
    ax.legend(loc="lower right")
    figure.tight_layout()
    return figure


def confusion_matrix_figure(predicted: np.ndarray, labels: np.ndarray, classes: list[str]):
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    figure, ax = pyplot().subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="confusion matrix")
    figure.tight_layout()
    return figure


def image_rows_figure(rows: dict[str, np.ndarray], title: str = ""):
    """One row per entry (name -> (N, H, W) images), N columns: e.g. original / masked / reconstructed."""
    n = min(len(v) for v in rows.values())
    figure, axes = pyplot().subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            axes[r, c].imshow(images[c], cmap="magma")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def binary_curves_figures(scores: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict:
    """{"roc.png", "pr.png"} for a binary finder; the PR plot marks the tuned threshold."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    roc, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc.tight_layout()
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    pr, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision)
    ax.axhline(labels.mean(), color="k", ls="--", lw=0.8, label=f"chance ({labels.mean():.3f})")
    if threshold is not None and len(thresholds):
        i = int(np.argmin(np.abs(thresholds - threshold)))
        ax.plot(recall[i], precision[i], "o", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    pr.tight_layout()
    return {"roc.png": roc, "pr.png": pr}


def curves_figure(curves: dict[str, list[tuple[int, float]]], ylabel: str, xlabel: str = "epoch"):
    """One line per label through its (step, value) points: runs compared on one axis."""
    figure, ax = pyplot().subplots(figsize=(5, 3.6))
    for label, points in curves.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    figure.tight_layout()
    return figure


def radial_power_spectrum(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of images (N, H, W) or (N, C, H, W), averaged over them.

    Returns k, the spatial frequency in cycles per pixel (0 up to the Nyquist 0.5, in steps
    of 1 / max(H, W)), and the mean of |FFT|^2 / (H W) over each annulus of width one step:
    white noise of standard deviation sigma gives sigma^2 at every k.
    """
    images = np.asarray(images, dtype=np.float64)
    h, w = images.shape[-2:]
    power = (np.abs(np.fft.fft2(images.reshape(-1, h, w))) ** 2).mean(axis=0) / (h * w)  # (H, W)
    step = 1.0 / max(h, w)
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))  # (H, W)
    bins = np.rint(radius / step).astype(np.int64)
    inside = bins <= int(round(0.5 / step))  # the corners beyond Nyquist are not full annuli
    total = np.bincount(bins[inside], weights=power[inside])
    counts = np.bincount(bins[inside])
    k = np.arange(len(total)) * step
    return k, total / np.maximum(counts, 1)


def power_spectrum_figure(images: dict[str, np.ndarray], title: str = "radially averaged power spectrum"):
    """One curve per entry (name -> images (N, H, W) or (N, C, H, W)), power on a log scale."""
    figure, ax = pyplot().subplots(figsize=(5, 3.8))
    for name, stack in images.items():
        k, power = radial_power_spectrum(stack)
        ax.semilogy(k[1:], power[1:], label=name)  # k = 0 is the mean brightness, not structure
    ax.set(xlabel="spatial frequency (cycles / pixel)", ylabel="power", title=title)
    ax.legend()
    figure.tight_layout()
    return figure
