"""Lens-parameter regression: theta_E, source position, ellipticity and external shear from an image.

    python -m platform.tune task=regression
    python -m platform.train task=regression init_from=models:/mae/latest encoder.arch=mae encoder.freeze=true

Targets are the simulator's truth labels. The shear angle phi is predicted as
(cos 2phi, sin 2phi): a shear is the same after a half turn, so this encoding has no seam
at 0 / pi and the network is never asked to jump. Targets are standardised with the
training split's statistics (filled into ``targets.*`` on the driver, so they are logged).

Metrics: the mean absolute error of each parameter in its own units (the angle's error
wrapped to [0, pi/2]) and ``mae_mean``, the mean of the errors each divided by that
parameter's spread in the training split, so no one unit dominates (optimised).

``init_from=`` loads an encoder trained by another task: ``encoder.arch=mae`` takes a
``mae`` run's ViT encoder, a timm name (the default ``resnet18``) takes a
``classification`` run's backbone; ``encoder.freeze=true`` trains the head alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import data
from platform.config import ConfigError
from platform.data import DataError
from platform.data.augment import AugmentConfig, batch_images
from platform.plots import pyplot
from platform.pretrained import load_matching
from platform.registry import Task, register
from tasks._shared import resized
from tasks.mae import MAEModelConfig, MaskedAutoencoder, mae_from

PARAMETERS = ("theta_e", "source_x", "source_y", "ellipticity", "shear", "shear_angle")
UNITS = {"theta_e": "arcsec", "source_x": "arcsec", "source_y": "arcsec", "ellipticity": "", "shear": "",
         "shear_angle": "rad"}
# Network outputs: the five plain parameters, then cos 2phi and sin 2phi.
OUTPUTS = 7


@dataclass
class EncoderConfig:
    arch: str = "resnet18"  # a timm model name, or "mae" for the mae task's ViT encoder (sized by encoder.mae.*)
    freeze: bool = False  # train only the head on top of a pretrained encoder
    mae: MAEModelConfig = field(default_factory=MAEModelConfig)

    def __post_init__(self):
        if self.arch != "mae" and self.arch not in timm.list_models(self.arch):
            raise ConfigError(f"encoder.arch={self.arch} is neither 'mae' nor a timm model name (e.g. resnet18)")


@dataclass
class TargetStats:
    # Of the training split, per plain parameter; filled in by build_data when empty.
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)


@dataclass
class RegressionConfig:
    init_from: str = ""  # an MLflow run id, models:/<name>/<version|latest>, or a best_model.pt path
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    targets: TargetStats = field(default_factory=TargetStats)
    # No augmentation by default: flips and rotations move the source and turn the shear.
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=0.0))


class Regressor(nn.Module):
    def __init__(self, encoder: nn.Module, features: int, freeze: bool):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(features, 256), nn.GELU(), nn.Linear(256, OUTPUTS))
        self.freeze = freeze
        for p in self.encoder.parameters():
            p.requires_grad_(not freeze)
        if isinstance(encoder, MaskedAutoencoder):
            encoder.freeze_decoder()  # only its encoder is used

    def features(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, D)
        if isinstance(self.encoder, MaskedAutoencoder):
            return self.encoder.forward_features(images)
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, 7)
        return self.head(self.features(images))


def build_model(cfg) -> Regressor:
    e = cfg.encoder
    if e.arch == "mae":
        return Regressor(mae_from(e.mae), e.mae.embed_dim, e.freeze)
    encoder = timm.create_model(e.arch, pretrained=False, in_chans=1, num_classes=0)  # (B, num_features)
    return Regressor(encoder, encoder.num_features, e.freeze)


def init_weights(model: Regressor, state: dict, cfg) -> list[str]:
    """An encoder from mae (the whole MAE state), classification (a timm model) or a regression run."""
    prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
    new = load_matching(model.encoder, state, prefix=prefix)
    if prefix:  # a regression run: its head fits too
        new = load_matching(model, state)
    return new


def build_data(cfg) -> dict:
    splits = data.substructure(cfg)
    columns = pq.read_schema(splits["train"].files[0]).names
    missing = [p for p in PARAMETERS if p not in columns]
    if missing:
        raise DataError(f"regression needs the simulator's truth labels; {splits['train'].path} has no "
                        f"{', '.join(missing)} (use simulated data: data.source=sim)")
    if cfg.targets.mean:
        if len(cfg.targets.mean) != 5 or len(cfg.targets.std) != 5:
            raise ConfigError(f"targets.mean and targets.std need 5 values ({', '.join(PARAMETERS[:5])})")
        return splits
    table = pq.ParquetDataset(splits["train"].files).read(columns=list(PARAMETERS[:5])).to_pydict()
    values = np.stack([np.asarray(table[p], dtype=np.float64) for p in PARAMETERS[:5]], axis=1)  # (N, 5)
    return splits, {"targets.mean": values.mean(0).round(6).tolist(),
                    "targets.std": np.maximum(values.std(0), 1e-6).round(6).tolist()}


def collate(batch: dict, cfg, training: bool) -> dict:
    images = batch_images(batch, cfg.augment, training)  # (B, 1, H, W)
    if cfg.encoder.arch == "mae":
        images = resized(images, cfg.encoder.mae.img_size)  # (B, 1, size, size)
    truth = np.stack([batch[p].astype(np.float32) for p in PARAMETERS], axis=1)  # (B, 6)
    return {"image": images, "truth": torch.from_numpy(truth)}


def _targets(truth: torch.Tensor, cfg) -> torch.Tensor:
    mean = torch.tensor(cfg.targets.mean, device=truth.device)
    std = torch.tensor(cfg.targets.std, device=truth.device)
    phi = truth[:, 5]
    return torch.cat([(truth[:, :5] - mean) / std, torch.stack([torch.cos(2 * phi), torch.sin(2 * phi)], 1)], 1)


def train_step(model, batch: dict, cfg) -> dict:
    prediction = model(batch["image"]).float()  # (B, 7)
    return {"loss": F.mse_loss(prediction, _targets(batch["truth"], cfg))}


def physical(out: torch.Tensor, cfg) -> torch.Tensor:
    """The network's (B, 7) outputs as the six parameters (B, 6) in their units."""
    out = out.float()
    mean = torch.tensor(cfg.targets.mean, device=out.device)
    std = torch.tensor(cfg.targets.std, device=out.device)
    angle = 0.5 * torch.atan2(out[:, 6], out[:, 5]) % torch.pi  # (B,) in [0, pi)
    return torch.cat([out[:, :5] * std + mean, angle[:, None]], 1)  # (B, 6) physical units


def eval_step(model, batch: dict, cfg) -> dict:
    return {"predicted": physical(model(batch["image"]), cfg), "truth": batch["truth"]}


def predict(model, images: torch.Tensor, cfg) -> dict:
    """Unlabelled images: each parameter in its unit (theta_e_arcsec, ..., shear_angle_rad)."""
    if len(cfg.targets.mean) != 5 or len(cfg.targets.std) != 5:
        raise ConfigError("targets.mean and targets.std put the outputs in their units: give the training run's "
                          "(model=<its run id> reads them from the run)")
    if cfg.encoder.arch == "mae":
        images = resized(images, cfg.encoder.mae.img_size)  # (B, 1, size, size)
    predicted = physical(model(images), cfg)  # (B, 6)
    return {f"{p}_{UNITS[p]}" if UNITS[p] else p: predicted[:, k] for k, p in enumerate(PARAMETERS)}


def angle_error(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """|difference| of two shear angles, modulo pi: at most pi/2."""
    return np.abs((predicted - truth + np.pi / 2) % np.pi - np.pi / 2)


def evaluate(outputs: dict, cfg) -> dict:
    predicted, truth = outputs["predicted"], outputs["truth"]  # (N, 6) each
    errors = np.abs(predicted - truth)
    errors[:, 5] = angle_error(predicted[:, 5], truth[:, 5])
    metrics = {f"mae_{p}": float(errors[:, k].mean()) for k, p in enumerate(PARAMETERS)}
    # The angle's spread: uniform on [0, pi) has a mean error of pi/4 against a fixed guess.
    spreads = list(cfg.targets.std) + [np.pi / 4]
    metrics["mae_mean"] = float(np.mean([metrics[f"mae_{p}"] / s for p, s in zip(PARAMETERS, spreads)]))
    return metrics


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    predicted, truth = outputs["predicted"], outputs["truth"]
    figure, axes = pyplot().subplots(2, 3, figsize=(10, 6.5))
    for k, (p, ax) in enumerate(zip(PARAMETERS, axes.flat)):
        ax.scatter(truth[:, k], predicted[:, k], s=6, alpha=0.6)
        lo, hi = float(truth[:, k].min()), float(truth[:, k].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        unit = f" ({UNITS[p]})" if UNITS[p] else ""
        ax.set(xlabel=f"true {p}{unit}", ylabel="predicted", title=p)
    figure.tight_layout()
    return {"predicted_vs_true.png": figure}


def embed(model: Regressor, batch: dict, cfg) -> torch.Tensor:
    return model.features(batch["image"])  # (B, D)


register(Task(
    name="regression",
    config=RegressionConfig,
    build_model=build_model,
    build_data=build_data,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="mae_mean",
    mode="min",
    plots=plots,
    embed=embed,
    predict=predict,
    embedding_colour="theta_e",  # the Einstein radius: the map should order the images by it
    init_weights=init_weights,
    inherit={"encoder.mae.": "model."},  # a mae run's encoder size (used with encoder.arch=mae)
    random_init={"encoder.freeze": False},  # train.compare_random_init: a frozen random encoder is no baseline
    description="lens-parameter regression (theta_E, source x/y, ellipticity, shear, shear angle)",
))
