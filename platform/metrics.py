"""Metrics computed from a whole split's gathered outputs (never averaged over batches)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, cross-entropy, macro and per-class one-vs-rest ROC AUC. probs (N, K), labels (N,)."""
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


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ROC AUC, PR AUC, and precision, recall and F1 at the threshold that maximises F1.

    scores (N,) probabilities of the positive class, labels (N,) 0/1. The threshold is tuned
    on these very outputs (the validation split), as one would before deploying a finder;
    it is reported so it can be reused.
    """
    labels = labels.astype(np.int64)
    if not 0 < labels.sum() < len(labels):
        nan = float("nan")
        return {"roc_auc": nan, "pr_auc": nan, "precision": nan, "recall": nan, "f1": nan, "threshold": nan}
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "f1": float(f1[best]),
        "threshold": float(thresholds[best]),
    }
