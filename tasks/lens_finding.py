"""Lens finding, DeepLense Test II: is there a strong lens in this three-band image?

    python -m platform.tune task=lens_finding
    python -m platform.train task=lens_finding data.path=/data/lens_finding   # {train,test}_{lenses,nonlenses}/
    python -m platform.train task=lens_finding adapt.path=/data/hsc_unlabelled adapt.method=dann

The simulated images follow the real HSC cutouts (``data.preset=hsc``, platform/data/lenses.py):
per-band min-max normalisation, the real sky level and noise, bright centred lens galaxies and
neighbours. ``data.preset=ideal`` is the uncalibrated simulator, a source domain for experiments.

Heavily imbalanced, as in the real data (about 1 lens in 17 training images, 1 in 101 test
images): a timm ResNet with one logit, weighted BCEWithLogits (``loss.pos_weight``, by
default the training split's negative/positive ratio), albumentations flips, right-angle
rotations, small shifts and noise. The decision threshold is tuned on the validation split
for F1 and reported with the precision, recall and F1 it gives. Optimises ROC AUC; PR AUC
is the figure to watch when lenses are rare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

from platform import config as config_lib
from platform import data
from platform.config import bounded
from platform.data import DataError
from platform.data import lenses
from platform.data.lenses import CLASS_NAMES, VERSION, simulate_lenses
from platform.explain import timm_features, timm_target
from platform.metrics import binary_metrics
from platform.plots import binary_curves_figures
from platform.registry import Task, register
from platform.report import Reference
from tasks._shared import timm_classifier
from tasks.classification import ModelConfig  # the same timm model settings


@dataclass
class LossConfig:
    # Weight of the positive (lens) term; None: the training split's negatives per positive.
    pos_weight: Optional[float] = bounded(None, 0.0, None, low_open=True)


@dataclass
class AugmentConfig:
    strength: float = bounded(0.5, 0.0, 1.0)  # 0 turns augmentation off; 1 always flips/rotates, shifts up to 6%


@dataclass
class SimConfig:
    train_positive_fraction: float = bounded(1 / 17, 0.0, 1.0, low_open=True)  # ~1:16, the DeepLense training split
    val_positive_fraction: float = bounded(1 / 101, 0.0, 1.0, low_open=True)  # val and test: ~1:100, as its test split


@dataclass
class LensFindingConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sim: SimConfig = field(default_factory=SimConfig)


def build_data(cfg) -> dict:
    """Simulated (or real) splits; fills in ``loss.pos_weight`` from the training split when unset."""
    d, root = cfg.data, config_lib.cache_dir(cfg)
    if d.source == "folder" or d.path:
        if not d.path:
            raise DataError("data.source=folder needs data.path=/path/to/lens_finding (train_lenses/, ...)")
        splits = data.from_folder(d.path, list(d.classes), root, d.shard_size, d.val_fraction, d.seed)
    else:
        if d.preset not in lenses.PRESETS:
            raise DataError(f"data.preset={d.preset} is not a lens-finding preset; expected one of {', '.join(lenses.PRESETS)}")
        sizes = data.split_sizes(d)
        fractions = {"train": cfg.sim.train_positive_fraction, "val": cfg.sim.val_positive_fraction,
                     "test": cfg.sim.val_positive_fraction}
        splits = {}
        for split in data.SPLITS:
            seed = data.split_seed(d.seed, split)
            params = {"preset": d.preset, "num_rows": sizes[split], "positive_fraction": fractions[split],
                      "seed": seed, "version": VERSION}
            splits[split] = data.cached_simulation(
                f"lens_finding-{d.preset}", params,
                lambda n=sizes[split], f=fractions[split], s=seed: simulate_lenses(n, f, s, d.preset),
                list(CLASS_NAMES), root, d.shard_size)
    data.check_classes(splits, list(d.classes))
    for split, shards in splits.items():
        negatives, positives = shards.manifest["counts"]
        if positives == 0 or negatives == 0:
            raise DataError(f"the {split} split has {positives} lenses and {negatives} non-lenses; both are needed "
                            f"(raise data.num_{split} or sim.{'train' if split == 'train' else 'val'}_positive_fraction)")
    if cfg.loss.pos_weight is not None:
        return splits
    negatives, positives = splits["train"].manifest["counts"]
    return splits, {"loss.pos_weight": negatives / positives}  # the training split's non-lenses per lens


def build_model(cfg) -> torch.nn.Module:
    return timm_classifier(cfg.model, in_chans=3, num_classes=1)  # (B, 1): a lens's logit


def _augmentation(strength: float, seed: int) -> A.Compose:
    return A.Compose([
        A.HorizontalFlip(p=0.5 * strength),
        A.VerticalFlip(p=0.5 * strength),
        A.RandomRotate90(p=strength),
        A.Affine(translate_percent=(-0.06 * strength, 0.06 * strength), border_mode=0, p=strength),
        A.GaussNoise(std_range=(0.0, 0.03 * strength), p=strength),
    ], seed=seed)


def collate(batch: dict, cfg, training: bool) -> dict:
    images = data.decode_images(batch)  # (B, 3, H, W), read-only
    if training and cfg.augment.strength > 0:
        # Seeded from NumPy's global generator, which the loop seeds per worker.
        augment = _augmentation(cfg.augment.strength, int(np.random.randint(2**31 - 1)))
        images = np.stack([augment(image=np.moveaxis(im, 0, -1))["image"] for im in images])  # (B, H, W, 3)
        images = np.moveaxis(images, -1, 1)  # (B, 3, H, W)
    return {"image": torch.from_numpy(np.array(images, dtype=np.float32)),  # a writable copy
            "label": torch.from_numpy(batch["label"].astype(np.float32))}


def train_step(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"]).squeeze(1)  # (B,)
    pos_weight = torch.tensor(cfg.loss.pos_weight, device=logits.device)
    return {"loss": F.binary_cross_entropy_with_logits(logits.float(), batch["label"], pos_weight=pos_weight)}


def eval_step(model, batch: dict, cfg) -> dict:
    return {"score": torch.sigmoid(model(batch["image"]).squeeze(1).float()), "label": batch["label"]}


def evaluate(outputs: dict, cfg, threshold: float | None = None) -> dict:
    """The finder's metrics; at ``threshold`` (the one chosen on val) or, on val, at the best F1's."""
    return binary_metrics(outputs["score"], outputs["label"], threshold)


def plots(model, batch: dict, outputs: dict, cfg, threshold: float | None = None) -> dict:
    threshold = binary_metrics(outputs["score"], outputs["label"], threshold)["threshold"]
    return binary_curves_figures(outputs["score"], outputs["label"].astype(np.int64), threshold)


def predict(model, images: torch.Tensor, cfg, threshold: float | None = None) -> dict:
    """Unlabelled images: the lens score and the verdict at the run's own threshold (chosen on its val split)."""
    score = torch.sigmoid(model(images).squeeze(1).float())  # (B,)
    return {"lens_score": score, "is_lens": score >= (0.5 if threshold is None else threshold)}


def gradcam(model, cfg):
    return timm_target(model)  # one logit: the lens class's evidence, or against it for a non-lens


def embed(model, batch: dict, cfg) -> torch.Tensor:
    return timm_features(model, batch["image"])  # (B, D)


register(Task(
    name="lens_finding",
    config=LensFindingConfig,
    build_model=build_model,
    build_data=build_data,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="roc_auc",
    mode="max",
    threshold_metric="threshold",  # val/threshold: tuned for F1 on the val split each epoch
    plots=plots,
    gradcam=gradcam,
    class_head=lambda model: model.get_classifier(),  # timm's last linear layer: what adapt.method aligns
    embed=embed,
    predict=predict,
    references=tuple(
        Reference("roc_auc", value, "ROC AUC, lens vs non-lens", model,
                  "REAL Hyper Suprime-Cam images (HSC-SSP PDR2), about 40,000, about 100 non-lenses per lens; "
                  "trained on lenstronomy simulations", "test: 20% of the real images (94 lenses, 8,000 non-lenses)",
                  "M. Nath, ML4SCI DeepLense GSoC 2022", "https://github.com/ML4SCI/DeepLense/blob/main/DeepLense_Gravitational_Lensing_Mriganka_Nath/README.md")
        for value, model in ((0.816, "EfficientNet-B2, no domain adaptation"),
                             (0.879, "equivariant CNN encoder with ADDA domain adaptation"))),
    defaults={"data.classes": list(CLASS_NAMES), "data.num_val": 1010, "data.preset": lenses.DEFAULT_PRESET},
    description="lens finding (lenses / non-lenses, 3 bands, imbalanced), timm ResNet, weighted BCE",
))
