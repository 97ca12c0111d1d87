"""Multitask: one encoder trained for substructure classification and image reconstruction at once.

    python -m platform.tune task=multitask
    python -m platform.train task=multitask loss.recon_weight=0.5 model.encoder=resnet34

A timm CNN encoder shared by two heads: a linear classifier on its pooled features
(no / sphere / vort) and a convolutional decoder that rebuilds the image from its last
feature map. The loss is cross-entropy + ``loss.recon_weight`` x reconstruction MSE: the
decoder makes the encoder keep what the image looks like, not only what separates the
classes, which is what a later task fine-tuning the encoder wants.

Optimises the macro one-vs-rest ROC AUC; also logs accuracy, each class's AUC and the
reconstruction MSE. The encoder (``encoder.*`` in the checkpoint) is what ``init_from=``
hands to ``regression`` (with the same ``encoder.arch``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import data
from platform.config import bounded
from platform.data.augment import AugmentConfig
from platform.explain import Logits, timm_features, timm_target
from platform.plots import image_rows_figure
from platform.registry import Task, register
from tasks._shared import check_timm_name, class_figures, class_metrics, class_predictions, labelled_images


@dataclass
class ModelConfig:
    encoder: str = "resnet18"  # any timm CNN with a spatial feature map
    decoder_channels: int = bounded(64, 4)  # width of the decoder's first stage; halved at each upsampling
    drop_rate: float = bounded(0.0, 0.0, 1.0, high_open=True)

    def __post_init__(self):
        check_timm_name("model.encoder", self.encoder)


@dataclass
class LossConfig:
    recon_weight: float = bounded(1.0, 0.0)  # 0 trains the classifier alone (the decoder then learns nothing)


@dataclass
class MultitaskConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class Decoder(nn.Module):
    """Feature map (B, C, h, w) -> image (B, 1, H, W): a 2x upsampling stage per halving the encoder did."""

    def __init__(self, in_channels: int, width: int, stages: int):
        super().__init__()
        layers, channels = [nn.Conv2d(in_channels, width, 1)], width
        for _ in range(stages):
            out = max(8, channels // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, out, 3, padding=1),
                       nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        image = self.layers(features)  # (B, 1, h * 2^stages, w * 2^stages)
        if image.shape[-2:] != size:  # sizes that are not a multiple of the encoder's stride
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(image)  # the images are min-max normalised to [0, 1]


class MultitaskNet(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, decoder_channels: int):
        super().__init__()
        self.encoder = encoder  # timm, num_classes=0: forward_head pools to (B, C)
        stride = encoder.feature_info[-1]["reduction"]
        self.classifier = nn.Linear(encoder.num_features, num_classes)
        self.decoder = Decoder(encoder.num_features, decoder_channels, int(math.log2(stride)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.encoder.forward_features(images)  # (B, C, H/stride, W/stride)
        logits = self.classifier(self.encoder.forward_head(feature_map))  # (B, K)
        reconstruction = self.decoder(feature_map, images.shape[-2:])  # (B, 1, H, W)
        return logits, reconstruction


def build_model(cfg) -> MultitaskNet:
    encoder = timm.create_model(cfg.model.encoder, pretrained=False, in_chans=1, num_classes=0,
                                drop_rate=cfg.model.drop_rate)
    return MultitaskNet(encoder, len(cfg.data.classes), cfg.model.decoder_channels)


def collate(batch: dict, cfg, training: bool) -> dict:
    return labelled_images(batch, cfg.augment, training)  # image (B, 1, H, W), label (B,)


def train_step(model, batch: dict, cfg) -> dict:
    logits, reconstruction = model(batch["image"])
    classification = F.cross_entropy(logits.float(), batch["label"])
    reconstruction = F.mse_loss(reconstruction.float(), batch["image"])
    return {"loss": classification + cfg.loss.recon_weight * reconstruction}


def eval_step(model, batch: dict, cfg) -> dict:
    logits, reconstruction = model(batch["image"])
    squared = (reconstruction.float() - batch["image"]) ** 2  # (B, 1, H, W)
    return {"probs": logits.float().softmax(dim=1), "label": batch["label"], "recon_mse": squared.mean(dim=(1, 2, 3))}


def evaluate(outputs: dict, cfg) -> dict:
    metrics = class_metrics(outputs, cfg)
    metrics["recon_mse"] = float(outputs["recon_mse"].mean())
    return metrics


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    images = batch["image"][:6]  # (N, 1, H, W)
    with torch.no_grad():
        _, reconstruction = model(images)
    rows = {"original": images[:, 0].float().cpu().numpy(), "reconstructed": reconstruction[:, 0].float().cpu().numpy()}
    return {**class_figures(outputs, cfg),
            "reconstructions.png": image_rows_figure(rows, f"recon_weight {cfg.loss.recon_weight:g}")}


def gradcam(model: MultitaskNet, cfg):
    return timm_target(Logits(model, operator.itemgetter(0)), model.encoder)  # the class logits, not the image


def embed(model: MultitaskNet, batch: dict, cfg) -> torch.Tensor:
    return timm_features(model.encoder, batch["image"])  # (B, D): what both heads read


register(Task(
    name="multitask",
    config=MultitaskConfig,
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
    class_head=lambda model: model.classifier,  # its input: the pooled features both heads read
    embed=embed,
    predict=lambda model, images, cfg: class_predictions(model(images)[0], cfg),
    description="shared timm encoder: substructure classification + image reconstruction",
))
