"""Metrics computed from a whole split's gathered outputs (never averaged over batches)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


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
