"""Autoencoder baseline: what reconstruction alone teaches an encoder about substructure.

    python -m platform.tune task=autoencoder
    python -m platform.train task=autoencoder model.latent_channels=16
    python -m platform.train task=regression init_from=<autoencoder run id>   # its encoder, encoder.arch=resnet18

The baseline of the DeepLense foundation-model write-up: a convolutional autoencoder (a timm
CNN encoder, a 1x1 bottleneck of ``model.latent_channels`` maps and an upsampling decoder)
trained on the MSE of its reconstructions, without labels. Its frozen encoder is then read by
a linear probe: a logistic regression on the pooled encoder features of the validation
images, scored by stratified ``probe.folds``-fold cross-validation (so the probe never sees
the images it is scored on, and the encoder never saw a label).

Metrics: ``recon_mse`` (optimised: the autoencoder's own objective), ``probe_accuracy`` and
``probe_auc`` (macro one-vs-rest ROC AUC), the numbers to hold against the supervised
classifiers and the MAE. The encoder (``encoder.*`` in the checkpoint, the same timm model as
``multitask``'s) is what ``init_from=`` hands to ``regression``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import data
from platform.config import bounded
from platform.data.augment import AugmentConfig
from platform.explain import timm_features
from platform.metrics import classification_metrics
from platform.plots import image_rows_figure
from platform.registry import Task, register
from platform.report import Reference
from tasks._shared import check_timm_name, labelled_images
from tasks.multitask import Decoder


@dataclass
class ModelConfig:
    encoder: str = "resnet18"  # any timm CNN with a spatial feature map
    latent_channels: int = bounded(32, 1)  # the bottleneck: maps at the encoder's last stride
    decoder_channels: int = bounded(64, 4)  # width of the decoder's first stage; halved at each upsampling

    def __post_init__(self):
        check_timm_name("model.encoder", self.encoder)


@dataclass
class ProbeConfig:
    folds: int = bounded(5, 2)  # stratified cross-validation folds of the linear probe
    c: float = bounded(1.0, 0.0, None, low_open=True)  # inverse L2 strength of the logistic regression


@dataclass
class AutoencoderConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class ConvAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, latent_channels: int, decoder_channels: int):
        super().__init__()
        self.encoder = encoder  # timm, num_classes=0: forward_head pools to (B, C)
        stride = encoder.feature_info[-1]["reduction"]
        self.bottleneck = nn.Conv2d(encoder.num_features, latent_channels, 1)
        self.decoder = Decoder(latent_channels, decoder_channels, int(np.log2(stride)))

    def forward(self, images: torch.Tensor, with_features: bool = False):
        """(B, 1, H, W) -> the reconstruction (B, 1, H, W) in [0, 1]; with ``with_features`` also the
        pooled encoder features (B, C), from the same pass (through DDP's wrapper, which has no other methods)."""
        feature_map = self.encoder.forward_features(images)  # (B, C, H/stride, W/stride)
        latent = self.bottleneck(feature_map)  # (B, latent, H/stride, W/stride)
        reconstruction = self.decoder(latent, images.shape[-2:])
        if with_features:
            return reconstruction, self.encoder.forward_head(feature_map, pre_logits=True)
        return reconstruction

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return timm_features(self.encoder, images)  # (B, C): what the probe and later tasks read


def build_model(cfg) -> ConvAutoencoder:
    encoder = timm.create_model(cfg.model.encoder, pretrained=False, in_chans=1, num_classes=0)
    return ConvAutoencoder(encoder, cfg.model.latent_channels, cfg.model.decoder_channels)


def collate(batch: dict, cfg, training: bool) -> dict:
    return labelled_images(batch, cfg.augment, training)  # image (B, 1, H, W), label (B,)


def train_step(model, batch: dict, cfg) -> dict:
    return {"loss": F.mse_loss(model(batch["image"]).float(), batch["image"])}  # no label: reconstruction alone


def eval_step(model, batch: dict, cfg) -> dict:
    images = batch["image"]  # (B, 1, H, W)
    reconstruction, features = model(images, with_features=True)  # (B, 1, H, W), (B, C)
    squared = (reconstruction.float() - images) ** 2  # (B, 1, H, W)
    return {"recon_mse": squared.mean(dim=(1, 2, 3)), "features": features.float(), "label": batch["label"]}


def linear_probe(features: np.ndarray, labels: np.ndarray, classes: list[str], folds: int, c: float) -> np.ndarray:
    """Out-of-fold class probabilities (N, K) of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present = np.bincount(labels, minlength=len(classes))
    folds = int(min(folds, present[present > 0].min()))
    probs = np.full((len(labels), len(classes)), 1.0 / len(classes))
    if folds < 2 or (present > 0).sum() < 2:
        return probs  # too few images of a class to score a probe: chance
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    seen = np.flatnonzero(present)
    out = cross_val_predict(probe, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                            method="predict_proba")  # (N, classes present)
    probs[:] = 0.0
    probs[:, seen] = out
    return probs


def evaluate(outputs: dict, cfg) -> dict:
    classes = list(cfg.data.classes)
    labels = outputs["label"].astype(np.int64)
    probs = linear_probe(outputs["features"], labels, classes, cfg.probe.folds, cfg.probe.c)
    probe = classification_metrics(probs, labels, classes)
    return {"recon_mse": float(outputs["recon_mse"].mean()), "probe_accuracy": probe["accuracy"],
            "probe_auc": probe["auc_macro"], **{f"probe_{k}": v for k, v in probe.items() if k.startswith("auc_")
                                                 and k != "auc_macro"}}


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    images = batch["image"][:6]  # (N, 1, H, W)
    with torch.no_grad():
        reconstruction = model(images).float()
    rows = {"original": images, "reconstructed": reconstruction, "residual": images - reconstruction}
    rows = {name: v[:, 0].cpu().numpy() for name, v in rows.items()}
    return {"reconstructions.png": image_rows_figure(rows, f"latent {cfg.model.latent_channels} maps")}


def embed(model: ConvAutoencoder, batch: dict, cfg) -> torch.Tensor:
    return model.features(batch["image"])  # (B, C): what the linear probe reads


register(Task(
    name="autoencoder",
    config=AutoencoderConfig,
    build_model=build_model,
    build_data=data.substructure,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="recon_mse",
    mode="min",
    plots=plots,
    embed=embed,
    references=(
        Reference("probe_auc", 0.730, "anomaly-detection ROC AUC: trained on no-substructure images only, "
                  "substructure scored as an anomaly (not a linear probe)", "deep convolutional autoencoder",
                  "simulated Model A (Alexander et al. 2020), 150x150", "the results table of the paper's code",
                  "Alexander et al. 2020, Decoding Dark Matter Substructure without Supervision (arXiv:2008.12731)",
                  "https://github.com/DeepLense-Unsupervised/unsupervised-lensing/blob/main/Results/README.md"),
    ),
    description="convolutional autoencoder baseline: reconstruction alone, then a linear probe",
))
