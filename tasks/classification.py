"""Substructure classification, DeepLense Common Test I: no substructure / subhalos (sphere) / vortex.

    python -m platform.tune task=classification
    python -m platform.train task=classification data.path=/data/dataset model.name=resnet34

A timm ResNet (one input channel, three classes) trained with cross-entropy. Optimises
the macro one-vs-rest ROC AUC, the figure published DeepLense results report; also logs
accuracy and each class's AUC, with ROC curves and a confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from platform import data
from platform.config import bounded
from platform.data.augment import AugmentConfig
from platform.explain import timm_features, timm_target
from platform.registry import Task, register
from platform.report import Reference
from tasks._shared import class_figures, class_metrics, class_predictions, labelled_images, timm_classifier


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
    return timm_classifier(cfg.model, in_chans=1, num_classes=len(cfg.data.classes))


def collate(batch: dict, cfg, training: bool) -> dict:
    return labelled_images(batch, cfg.augment, training)  # image (B, 1, H, W), label (B,)


def train_step(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"])  # (B, K)
    return {"loss": F.cross_entropy(logits, batch["label"])}


def eval_step(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"]).float()  # (B, K)
    return {"probs": logits.softmax(dim=1), "label": batch["label"]}


def evaluate(outputs: dict, cfg) -> dict:
    return class_metrics(outputs, cfg)


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    return class_figures(outputs, cfg)


def gradcam(model, cfg):
    return timm_target(model)  # a ResNet's last stage; a timm ViT's last block, with its reshape


def embed(model, batch: dict, cfg) -> torch.Tensor:
    return timm_features(model, batch["image"])  # (B, D)


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
    gradcam=gradcam,
    class_head=lambda model: model.get_classifier(),  # timm's last linear layer: what adapt.method aligns
    embed=embed,
    predict=lambda model, images, cfg: class_predictions(model(images), cfg),
    references=(
        Reference("auc_macro", 0.9942, "micro-average one-vs-rest ROC AUC over the 3 classes (not macro)", "ResNet-18",
                  "simulated Model F (Alexander et al. 2020's Model A), 150x150: no / sphere / vortex",
                  "held-out test set: 75,000 training and 7,500 test images, a third of each per class",
                  "A. Singh, ML4SCI DeepLense GSoC 2021",
                  "https://github.com/ML4SCI/DeepLense/blob/main/Equivariant_Neural_Networks_for_DeepLense_Apoorva_Singh/Results/Readme.md"),
        Reference("accuracy", 0.9941, "accuracy over the 3 classes", "CvT (convolutional vision transformer)",
                  "simulated Model II (64x64, Euclid-like), 30,000 images per class",
                  "a held-out test set (its size not stated)", "K. Sachdev, ML4SCI DeepLense GSoC 2022-23",
                  "https://github.com/ML4SCI/DeepLense/blob/main/Transformers_Classification_DeepLense_Kartik_Sachdev/README.md"),
    ),
    description="substructure classification (no / sphere / vort), timm ResNet",
))
