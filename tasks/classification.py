"""Substructure classification, DeepLense Common Test I: no substructure / subhalos (sphere) / vortex.

    python -m platform.tune task=classification
    python -m platform.train task=classification data.path=/data/dataset model.name=resnet34

A timm ResNet (one input channel, three classes) trained with cross-entropy. Optimises
the macro one-vs-rest ROC AUC, the figure published DeepLense results report; also logs
accuracy and each class's AUC, with ROC curves and a confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn.functional as F

from platform import data
from platform.config import bounded
from platform.data.augment import AugmentConfig, batch_images
from platform.metrics import classification_metrics
from platform.plots import confusion_matrix_figure, roc_figure
from platform.registry import Task, register


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    pretrained_path: str = ""  # local weights file; nothing is downloaded at run time
    drop_rate: float = bounded(0.0, 0.0, 1.0, high_open=True)


@dataclass
class ClassificationConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def build_model(cfg) -> torch.nn.Module:
    weights = cfg.model.pretrained_path
    return timm.create_model(
        cfg.model.name,
        pretrained=bool(weights),
        pretrained_cfg_overlay={"file": weights} if weights else None,
        in_chans=1,
        num_classes=len(cfg.data.classes),
        drop_rate=cfg.model.drop_rate,
    )


def collate(batch: dict, cfg, training: bool) -> dict:
    images = batch_images(batch, cfg.augment, training)  # (B, 1, H, W)
    return {"image": images, "label": torch.from_numpy(batch["label"].astype(np.int64))}


def train_step(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"])  # (B, K)
    return {"loss": F.cross_entropy(logits, batch["label"])}


def eval_step(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"]).float()  # (B, K)
    return {"probs": logits.softmax(dim=1), "label": batch["label"]}


def evaluate(outputs: dict, cfg) -> dict:
    return classification_metrics(outputs["probs"], outputs["label"].astype(np.int64), list(cfg.data.classes))


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    labels, classes = outputs["label"].astype(np.int64), list(cfg.data.classes)
    return {
        "roc.png": roc_figure(outputs["probs"], labels, classes),
        "confusion_matrix.png": confusion_matrix_figure(outputs["probs"].argmax(1), labels, classes),
    }


register(Task(
    name="classification",
    config=ClassificationConfig,
    build_model=build_model,
    build_data=data.substructure,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="auc_macro",
    mode="max",
    plots=plots,
    description="substructure classification (no / sphere / vort), timm ResNet",
))
