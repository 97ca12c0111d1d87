"""Physics-informed substructure classification: a ResNet that also has to explain the lens.

    python -m platform.tune task=pinn
    python -m platform.train task=pinn physics.lens_model=sie physics.shear=true physics.schedule=cosine
    python -m platform.train task=pinn data.path=/data/dataset physics.pixel_scale=0.05   # real images

A timm ResNet backbone predicts the lens (Einstein radius theta_E and centre; with
``physics.lens_model=sie`` also the axis ratio and angle, with ``physics.shear=true`` an
external shear). A differentiable lensing layer (platform/lensing.py) ray-traces every pixel
of the observed image back to the source plane, beta = theta - alpha(theta), and splats its
light there (the adjoint of grid_sample's bilinear sampling): the reconstructed source. A
correct lens focuses the ring back onto one compact, smooth source; a wrong one leaves an
arc or a ring. The physics loss says so:

    compactness   second moment of the source-plane light about its centroid, over the
                  image's own (1 at theta_E = 0, ~0.01 at the truth)
    smoothness    total variation of the reconstructed surface brightness, over the image's
    consistency   the source lensed again (grid_sample at beta) against the observed light

and the training loss is cross-entropy + lambda(epoch) x physics, with lambda scheduled by
``physics.schedule`` (constant, linear, cosine, step), ``physics.lambda_max`` and
``physics.warmup_epochs``. Nothing supervises the lens parameters: they are what the physics
finds. The classifier sees the backbone's features and a small CNN's features of the
reconstructed source, where substructure shows as a source that will not come into focus.

Optimises the macro one-vs-rest ROC AUC; also logs accuracy, each class's AUC, the physics
loss and its terms, and, on simulated data whose truth is known, the theta_E error (arcsec
and relative) and the lens-centre error (every simulated lens sits at the origin).
Plots: observed images, reconstructed sources and predicted critical curves; ROC curves.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import timm
from timm.layers import GroupNorm
import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import data, lensing
from platform.config import ConfigError, bounded, choice
from platform.data import simulate
from platform.data.augment import AugmentConfig, batch_images
from platform.explain import Logits, timm_target
from platform.metrics import classification_metrics
from platform.plots import pyplot, roc_figure
from platform.registry import Task, register
from platform.report import Reference
from tasks._shared import check_timm_name, class_predictions

SCHEDULES = ("constant", "linear", "cosine", "step")
THETA_E_RANGE = (0.2, 3.0)  # arcsec: every galaxy-scale lens, and rings that fit in the DeepLense fields
MAX_ELLIPTICITY = 0.7 / 1.3  # (1 - q) / (1 + q) at q = 0.3
MAX_SHEAR = 0.3
# Pixels brighter than the background (the median) by this many noise sigmas (from the
# median absolute deviation) carry the lens's light; the rest would smear noise over the
# whole source plane and swamp its moments.
SIGNAL_SIGMAS = 2.0
# Source pixels reached by only a sliver of a ray fade out instead of showing that ray's
# value at full strength: the reconstructed brightness stays continuous as rays move.
COVERAGE_FLOOR = 0.1


@dataclass
class ModelConfig:
    backbone: str = "resnet10t"  # a timm ResNet; resnet18, resnet34 for more capacity
    source_channels: int = bounded(16, 4)  # width of the CNN on the reconstructed source
    drop_rate: float = bounded(0.0, 0.0, 1.0, high_open=True)
    # batch: BatchNorm whose running statistics follow the last few batches (momentum 0.5, not
    # torch's 0.1). A classifier's ranking barely notices running statistics that lag the
    # weights, but the lens head's theta_E moves with any train/eval mismatch, and in a short
    # run torch's default left the evaluated theta_E 0.2" off the trained one. group: GroupNorm,
    # no mismatch at all and batch-size independent, but slower to train from scratch.
    norm: str = choice("batch", ["batch", "group"])

    def __post_init__(self):
        check_timm_name("model.backbone", self.backbone, family="resnet")


@dataclass
class PhysicsConfig:
    schedule: str = choice("linear", SCHEDULES)  # how lambda grows to lambda_max (see physics_weight)
    lambda_max: float = bounded(1.0, 0.0)  # 0: a plain classifier that also looks at the (untrained) source
    warmup_epochs: int = bounded(1, 0)  # epochs before the physics weighs fully (constant ignores it)
    lens_model: str = choice("sis", ["sis", "sie"])
    shear: bool = False  # also fit an external shear (g1, g2)
    pixel_scale: Optional[float] = bounded(None, 0.0, None, low_open=True)  # arcsec/px; default: data.preset's
    source_pixels: int = bounded(32, 4)  # the reconstructed source is source_pixels x source_pixels
    source_fov: float = bounded(0.5, 0.0, 2.0, low_open=True)  # its width over the image's width
    max_offset: float = bounded(0.1, 0.0, 1.0)  # largest lens-centre offset, as a fraction of the half field
    smoothness_weight: float = bounded(0.1, 0.0)
    consistency_weight: float = bounded(0.05, 0.0)


@dataclass
class PinnConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # flips and quarter turns keep the lens a lens


# ---------------------------------------------------------------------------- the lensing layer


def lens_parameters(raw: torch.Tensor, physics: PhysicsConfig, half_field: float) -> dict[str, torch.Tensor]:
    """The lens head's unbounded outputs (B, P) as physical parameters, each (B,), inside sane ranges."""
    lo, hi = THETA_E_RANGE
    offset = physics.max_offset * half_field
    lens = {"theta_e": lo + (hi - lo) * torch.sigmoid(raw[:, 0]),
            "x0": offset * torch.tanh(raw[:, 1]), "y0": offset * torch.tanh(raw[:, 2])}
    k = 3
    if physics.lens_model == "sie":
        # Ellipticity as a 2-vector (e cos 2phi, e sin 2phi): no seam where phi wraps at pi.
        u, v = raw[:, 3], raw[:, 4]
        e = MAX_ELLIPTICITY * torch.tanh(torch.sqrt(u * u + v * v + 1e-12))
        lens["q"] = (1 - e) / (1 + e)
        lens["phi"] = 0.5 * torch.atan2(v, u)  # torch gives atan2 zero gradients at (0, 0)
        k = 5
    if physics.shear:
        lens["g1"], lens["g2"] = MAX_SHEAR * torch.tanh(raw[:, k]), MAX_SHEAR * torch.tanh(raw[:, k + 1])
    return lens


def num_lens_outputs(physics: PhysicsConfig) -> int:
    return 3 + 2 * (physics.lens_model == "sie") + 2 * physics.shear


def deflection(lens: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """alpha(theta) of a predicted (or true) lens on the grid x, y: (B, H, W) each."""
    if "q" in lens:
        ax, ay = lensing.sie_deflection(x, y, lens["theta_e"], lens["q"], lens["phi"], lens["x0"], lens["y0"])
    else:
        ax, ay = lensing.sis_deflection(x, y, lens["theta_e"], lens["x0"], lens["y0"])
    if "g1" in lens:
        sx, sy = lensing.shear_deflection(x, y, lens["g1"], lens["g2"])
        ax, ay = ax + sx, ay + sy
    return ax, ay


def signal(images: torch.Tensor) -> torch.Tensor:
    """The lens's light (B, H, W): what stands above the background by SIGNAL_SIGMAS noise sigmas."""
    flat = images.flatten(1)  # (B, H*W)
    background = flat.median(dim=1, keepdim=True).values
    sigma = 1.4826 * (flat - background).abs().median(dim=1, keepdim=True).values
    return F.relu(flat - background - SIGNAL_SIGMAS * sigma).reshape(images.shape)


def _moments(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Second moment (B,) of the positions x, y (B, H, W) about their centroid, weighted by weights."""
    total = weights.sum(dim=(1, 2)).clamp(min=1e-12)
    cx = (weights * x).sum(dim=(1, 2)) / total
    cy = (weights * y).sum(dim=(1, 2)) / total
    spread = (x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2
    return (weights * spread).sum(dim=(1, 2)) / total


def _total_variation(images: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B,)
    return ((images[:, 1:] - images[:, :-1]).abs().sum(dim=(1, 2))
            + (images[:, :, 1:] - images[:, :, :-1]).abs().sum(dim=(1, 2)))


def reconstruct(images: torch.Tensor, lens: dict[str, torch.Tensor], pixel_scale: float, physics: PhysicsConfig):
    """Ray-trace the observed images (B, H, W) back to the source plane; the physics terms of that source.

    Returns the reconstructed source brightness (B, n, n) on a grid of source_fov times the
    image's width, its pixel scale, and compactness, smoothness, consistency (B,) each.
    """
    b, h, w = images.shape
    x, y = lensing.pixel_grid(h, pixel_scale, device=images.device, dtype=images.dtype)  # (H, W)
    ax, ay = deflection(lens, x, y)
    beta_x, beta_y = lensing.ray_trace(x, y, ax, ay)  # (B, H, W)
    light = signal(images)  # (B, H, W)
    n = physics.source_pixels
    source_scale = h * pixel_scale * physics.source_fov / n
    flux, coverage = lensing.splat_to_source_plane(light, beta_x, beta_y, n, source_scale)  # (B, n, n) each
    source = flux / (coverage + COVERAGE_FLOOR)  # surface brightness: light per ray landing there
    # The moment of the splatted light, taken over the rays themselves: the same moment
    # without the bilinear ripple (kinks each time a ray crosses a source pixel) and without
    # the source grid's edge, where rays that leave it would make a wrong lens look compact.
    # Over the image's own moment: dimensionless, 1 for no lens.
    compactness = _moments(light, beta_x, beta_y) / _moments(light, x.expand_as(light), y.expand_as(light)).clamp(min=1e-12)
    smoothness = _total_variation(source) / _total_variation(light).clamp(min=1e-12)
    relensed = lensing.sample_source_plane(source, beta_x, beta_y, source_scale)  # (B, H, W)
    consistency = ((relensed - light) ** 2).sum(dim=(1, 2)) / (light**2).sum(dim=(1, 2)).clamp(min=1e-12)
    return {"source": source, "source_scale": source_scale, "compactness": compactness,
            "smoothness": smoothness, "consistency": consistency}


def physics_loss(terms: dict, physics: PhysicsConfig) -> torch.Tensor:
    """Per image (B,). Compactness alone locates theta_E (one minimum, within a few per cent of the
    truth); total variation alone prefers an over-focused source and is bumpy, and consistency alone
    is best with no lens at all: small weights let them sharpen the minimum without moving it."""
    return (terms["compactness"] + physics.smoothness_weight * terms["smoothness"]
            + physics.consistency_weight * terms["consistency"])


# ---------------------------------------------------------------------------- model


class SourceNet(nn.Module):
    """Features (B, 4c) of a reconstructed source (B, 1, n, n): three conv stages, global pooling."""

    def __init__(self, channels: int, norm):
        super().__init__()
        layers, c_in = [], 1
        for c_out in (channels, 2 * channels, 4 * channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.GELU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.layers(source)


class PhysicsInformedNet(nn.Module):
    def __init__(self, backbone: nn.Module, source_net: SourceNet, num_classes: int, pixel_scale: float,
                 physics: PhysicsConfig):
        super().__init__()
        self.backbone = backbone  # timm, num_classes=0: (B, D) pooled features
        self.lens_head = nn.Sequential(nn.Linear(backbone.num_features, 128), nn.GELU(),
                                       nn.Linear(128, num_lens_outputs(physics)))
        # Start every image at the middle of the prior (theta_E 1.6", centred, round, no shear).
        with torch.no_grad():
            self.lens_head[-1].weight.mul_(0.1)
            self.lens_head[-1].bias.zero_()
        self.source_net = source_net
        self.classifier = nn.Linear(backbone.num_features + self.source_net.num_features, num_classes)
        self.pixel_scale, self.physics = pixel_scale, physics

    def forward(self, images: torch.Tensor) -> dict:  # images (B, 1, H, W)
        features = self.backbone(images)  # (B, D)
        half_field = images.shape[-1] * self.pixel_scale / 2
        # The lensing layer in float32 whatever the autocast: sub-pixel ray positions need it.
        with torch.autocast(images.device.type, enabled=False):
            lens = lens_parameters(self.lens_head(features.float()), self.physics, half_field)
            out = reconstruct(images[:, 0].float(), lens, self.pixel_scale, self.physics)
        # Detached: the classifier's loss must not bend the lens to suit it; the lens is what
        # the physics finds, and the classifier reads the source that lens gives.
        source_features = self.source_net(out["source"].detach()[:, None])  # (B, 4c)
        logits = self.classifier(torch.cat([features, source_features.to(features.dtype)], dim=1))  # (B, K)
        return {"logits": logits, "lens": lens, **out}


def pixel_scale(cfg) -> float:
    """arcsec/px: physics.pixel_scale, or the simulator preset's."""
    return cfg.physics.pixel_scale or simulate.get_preset(cfg.data.preset).pixel_scale


def build_model(cfg) -> PhysicsInformedNet:
    norm = {"batch": functools.partial(nn.BatchNorm2d, momentum=0.5),
            "group": functools.partial(GroupNorm, num_groups=8)}[cfg.model.norm]  # 8 divides every ResNet width
    backbone = timm.create_model(cfg.model.backbone, pretrained=False, in_chans=1, num_classes=0,
                                 drop_rate=cfg.model.drop_rate, norm_layer=norm)
    source_net = SourceNet(cfg.model.source_channels, norm)
    return PhysicsInformedNet(backbone, source_net, len(cfg.data.classes), pixel_scale(cfg), cfg.physics)


# ---------------------------------------------------------------------------- data


def build_data(cfg) -> dict:
    """The substructure splits; physics.pixel_scale from the simulator preset, required for real images."""
    real = cfg.data.source == "folder" or bool(cfg.data.path)
    if real and cfg.physics.pixel_scale is None:
        raise ConfigError(f"physics.pixel_scale is required with data.path={cfg.data.path} (real images do not say "
                          f"their arcsec per pixel); e.g. physics.pixel_scale=0.05 for DeepLense Model I / Test I")
    splits = data.substructure(cfg)
    if cfg.physics.pixel_scale is not None:
        return splits
    return splits, {"physics.pixel_scale": simulate.get_preset(cfg.data.preset).pixel_scale}


TRUTH = ("theta_e", "lens_q", "lens_phi", "shear", "shear_angle")  # the simulated lens, where known


def collate(batch: dict, cfg, training: bool) -> dict:
    images = batch_images(batch, cfg.augment, training)  # (B, 1, H, W)
    out = {"image": images, "label": torch.from_numpy(batch["label"].astype(np.int64))}
    if all(k in batch for k in TRUTH):
        # Flips and quarter turns of a lens at the origin keep theta_E; only the plots use the angles.
        out["lens_truth"] = torch.from_numpy(np.stack([batch[k].astype(np.float32) for k in TRUTH], axis=1))  # (B, 5)
    return out


# ---------------------------------------------------------------------------- training


def physics_weight(epoch: int, physics: PhysicsConfig, total_epochs: int) -> float:
    """lambda(epoch) for a 0-based epoch: lambda_max times a ramp from 0 to 1.

    constant  1 from the first epoch (warmup_epochs does not apply: that would be step)
    linear    (epoch + 1) / (W + 1): W epochs on the way up, full weight from epoch W
    cosine    the same progress through half a cosine: slow start, slow finish
    step      0 for the first W epochs, then 1
    W is physics.warmup_epochs, cut to total_epochs - 1 so that the last epoch always trains
    with the full physics (a sampled warm-up longer than a short trial would otherwise never end).
    """
    if physics.schedule == "constant":
        return physics.lambda_max
    warmup = min(physics.warmup_epochs, max(total_epochs - 1, 0))
    progress = min(1.0, (epoch + 1) / (warmup + 1))
    if physics.schedule == "linear":
        ramp = progress
    elif physics.schedule == "cosine":
        ramp = 0.5 * (1 - math.cos(math.pi * progress))
    else:
        ramp = float(epoch >= warmup)
    return physics.lambda_max * ramp


def train_step(model, batch: dict, cfg) -> dict:
    out = model(batch["image"])
    classification = F.cross_entropy(out["logits"].float(), batch["label"])
    physics = physics_loss(out, cfg.physics).mean()
    weight = physics_weight(batch["epoch"], cfg.physics, cfg.train.epochs)
    return {"loss": classification + weight * physics, "classification": classification.detach(),
            "physics": physics.detach()}


def eval_step(model, batch: dict, cfg) -> dict:
    out = model(batch["image"])
    outputs = {"probs": out["logits"].float().softmax(dim=1), "label": batch["label"],
               "theta_e": out["lens"]["theta_e"], "centre": torch.stack([out["lens"]["x0"], out["lens"]["y0"]], 1),
               "physics": physics_loss(out, cfg.physics), "compactness": out["compactness"],
               "smoothness": out["smoothness"], "consistency": out["consistency"]}
    if "lens_truth" in batch:
        outputs["theta_e_true"] = batch["lens_truth"][:, 0]
    return outputs


def predict(model, images: torch.Tensor, cfg) -> dict:
    """Unlabelled images: class probabilities, and the lens the physics branch fitted."""
    out = model(images)
    return {**class_predictions(out["logits"], cfg), "theta_e_arcsec": out["lens"]["theta_e"].float()}


def evaluate(outputs: dict, cfg) -> dict:
    metrics = classification_metrics(outputs["probs"], outputs["label"].astype(np.int64), list(cfg.data.classes))
    metrics["physics_loss"] = float(outputs["physics"].mean())
    for term in ("compactness", "smoothness", "consistency"):
        metrics[f"physics_{term}"] = float(outputs[term].mean())
    if "theta_e_true" in outputs:
        error = np.abs(outputs["theta_e"] - outputs["theta_e_true"])
        metrics["theta_e_error"] = float(error.mean())  # arcsec
        metrics["theta_e_rel_error"] = float((error / outputs["theta_e_true"]).mean())
        metrics["centre_error"] = float(np.hypot(*outputs["centre"].T).mean())  # simulated lenses sit at the origin
    return metrics


# ---------------------------------------------------------------------------- plots


def _true_lens(truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """The simulator's lens (SIE + external shear about the origin) from lens_truth rows (B, 5)."""
    g1, g2 = lensing.shear_components(truth[:, 3], truth[:, 4])
    zero = torch.zeros_like(truth[:, 0])
    return {"theta_e": truth[:, 0], "q": truth[:, 1], "phi": truth[:, 2], "x0": zero, "y0": zero, "g1": g1, "g2": g2}


def _critical_map(lens: dict, x: torch.Tensor, y: torch.Tensor, scale: float) -> np.ndarray:
    """det(d beta / d theta) (N, H, W), masked within two pixels of the lens centre: there an
    isothermal deflection jumps, and finite differences would draw a spurious curve around it."""
    det = lensing.inverse_magnification(*deflection(lens, x, y), scale)
    r = torch.hypot(x - lens["x0"][:, None, None], y - lens["y0"][:, None, None])
    return np.ma.masked_where((r < 2 * scale).cpu().numpy(), det.cpu().numpy())


def lensing_figure(model, batch: dict, cfg, n: int = 6):
    """Observed images, their reconstructed sources and the predicted (solid) and true (dashed) critical curves."""
    images = batch["image"][:n]  # (N, 1, H, W)
    with torch.no_grad():
        out = model(images)
    h = images.shape[-1]
    scale = model.pixel_scale
    x, y = lensing.pixel_grid(h, scale, device=images.device)
    truth = batch.get("lens_truth")
    with torch.no_grad():
        predicted = _critical_map(out["lens"], x, y, scale)  # (N, H, W)
        true = _critical_map(_true_lens(truth[:n].float()), x, y, scale) if truth is not None else None
    half, source_half = h * scale / 2, cfg.physics.source_pixels * out["source_scale"] / 2
    grid = x[0].cpu().numpy()
    figure, axes = pyplot().subplots(3, len(images), figsize=(2.1 * len(images), 6.6), squeeze=False)
    for i in range(len(images)):
        image = images[i, 0].float().cpu().numpy()
        te = float(out["lens"]["theta_e"][i])
        title = f"$\\theta_E$ {te:.2f}\"" + (f" (true {float(truth[i, 0]):.2f})" if truth is not None else "")
        axes[0, i].imshow(image, origin="lower", cmap="magma", extent=(-half, half, -half, half))
        axes[0, i].set_title(title, fontsize=8)
        axes[1, i].imshow(out["source"][i].cpu().numpy(), origin="lower", cmap="magma",
                          extent=(-source_half, source_half, -source_half, source_half))
        axes[2, i].imshow(image, origin="lower", cmap="gray", extent=(-half, half, -half, half))
        axes[2, i].contour(grid, grid, predicted[i], levels=[0.0], colors="cyan", linewidths=1.0)
        if true is not None:
            axes[2, i].contour(grid, grid, true[i], levels=[0.0], colors="orange", linewidths=1.0, linestyles="--")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, name in enumerate(["observed", "source", "critical curve"]):
        axes[row, 0].set_ylabel(name)
    figure.suptitle("predicted (cyan) and true (orange, dashed) critical curves", fontsize=9)
    figure.tight_layout()
    return figure


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    labels, classes = outputs["label"].astype(np.int64), list(cfg.data.classes)
    return {"lensing.png": lensing_figure(model, batch, cfg), "roc.png": roc_figure(outputs["probs"], labels, classes)}


def gradcam(model: PhysicsInformedNet, cfg):
    # The backbone's last stage: the source branch reads the lensing layer's output, detached.
    return timm_target(Logits(model, operator.itemgetter("logits")), model.backbone)


def embed(model: PhysicsInformedNet, batch: dict, cfg) -> torch.Tensor:
    return model.backbone(batch["image"])  # (B, D): what the lens head and the classifier read


register(Task(
    name="pinn",
    config=PinnConfig,
    build_model=build_model,
    build_data=build_data,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="auc_macro",
    mode="max",
    plots=plots,
    gradcam=gradcam,
    class_head=lambda model: model.classifier,  # its input: the backbone's and the source branch's features
    embed=embed,
    predict=predict,
    references=(
        Reference("auc_macro", 0.865, "ROC AUC of a BINARY task (no substructure vs CDM subhalos), not 3 classes",
                  "Lensiformer: a transformer with an inverse-lensing layer, 13M parameters",
                  "simulated Real-Galaxy-Tiny (Galaxy10 DECaLS sources, HST-like)",
                  "1,000 training and 1,000 test images, 3,000 epochs",
                  "L. José, ML4SCI DeepLense GSoC 2023 (NeurIPS 2023 ML4PS)",
                  "https://github.com/ML4SCI/DeepLense/blob/main/Physics_Informed_Transformers_For_Dark-Matter_Morphology_Lucas_Jose/README.md"),
    ),
    defaults={"data.num_train": 768, "data.num_val": 192},
    description="physics-informed substructure classification: a lens head, a differentiable lensing layer, "
                "a scheduled source-plane physics loss",
))
