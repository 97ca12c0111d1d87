"""What several tasks build the same way: a timm classifier, a labelled batch, class metrics and figures,
a resize to the model's input, a timm name checked when the config is built.

The leading underscore keeps it out of task discovery: it registers nothing. Tasks import the core's
helpers (``platform.data``, ``platform.metrics``, ``platform.plots``) and these, never its machinery.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from platform.config import ConfigError
from platform.data.augment import batch_images
from platform.metrics import classification_metrics
from platform.plots import confusion_matrix_figure, roc_figure


def timm_classifier(model_cfg, in_chans: int, num_classes: int) -> torch.nn.Module:
    """A timm model (``model_cfg.name``, ``drop_rate``), from ``pretrained_path`` when one is given:
    nothing is downloaded at run time."""
    import timm  # here, not at the top: only the processes that build the model pay for it (2-3 s)

    weights = model_cfg.pretrained_path
    return timm.create_model(model_cfg.name, pretrained=bool(weights),
                             pretrained_cfg_overlay={"file": weights} if weights else None,
                             in_chans=in_chans, num_classes=num_classes, drop_rate=model_cfg.drop_rate)


def check_timm_name(setting: str, name: str, family: str = "") -> None:
    """A config's timm model name, refused in one line when timm has no such model (of ``family``: "resnet")."""
    import timm

    known = timm.list_models(module=family) if family else timm.list_models(name)
    if name not in known:
        what = ("a timm ResNet (e.g. resnet10t, resnet18, resnet34)" if family == "resnet"
                else "a timm model name (e.g. resnet18, resnet10t)")
        raise ConfigError(f"{setting}={name} is not {what}")


def labelled_images(batch: dict, augment, training: bool) -> dict:
    """{"image": (B, 1, H, W) augmented when training, "label": (B,) class indices}."""
    images = batch_images(batch, augment, training)  # (B, 1, H, W)
    return {"image": images, "label": torch.from_numpy(batch["label"].astype(np.int64))}


def class_metrics(outputs: dict, cfg) -> dict:
    """Accuracy, macro and per-class ROC AUC of gathered ``probs`` (N, K) against ``label`` (N,)."""
    return classification_metrics(outputs["probs"], outputs["label"].astype(np.int64), list(cfg.data.classes))


def class_figures(outputs: dict, cfg) -> dict:
    """The ROC curves and the confusion matrix of gathered ``probs`` and ``label``."""
    labels, classes = outputs["label"].astype(np.int64), list(cfg.data.classes)
    return {
        "roc.png": roc_figure(outputs["probs"], labels, classes),
        "confusion_matrix.png": confusion_matrix_figure(outputs["probs"].argmax(1), labels, classes),
    }


def class_predictions(logits: torch.Tensor, cfg) -> dict:
    """Unlabelled images' class probabilities (B, K) and the most likely class, by name."""
    probs = logits.float().softmax(dim=1)  # (B, K)
    return {"probs": probs, "predicted": np.asarray(cfg.data.classes)[probs.argmax(dim=1).cpu().numpy()]}


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) images at (size, size), antialiased; as they are when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
