"""Fine-tuning the `mae` task's pretrained ViT encoder: substructure classification or super-resolution.

    python -m platform.tune task=mae                                          # pretrain
    python -m platform.tune task=mae_finetune init_from=models:/mae/latest    # then fine-tune
    python -m platform.train task=mae_finetune init_from=<run id> head=superres finetune.freeze_epochs=2

``init_from=`` names the pretraining run (a run id, ``models:/mae/<version|latest>`` or a
``best_model.pt`` path). From an MLflow run the encoder's size (``model.*``) is taken from
the run's own parameters, so the two cannot disagree; the run is tagged and parametrised
with where it came from, so the MLflow UI links the two.

Two heads on the encoder's patch tokens:
  head=classification  mean-pooled tokens -> LayerNorm -> linear (no / sphere / vort);
                       optimises macro AUC, logs accuracy and each class's AUC
  head=superres        tokens -> a few convolutions -> PixelShuffle back to pixels -> a
                       zero-initialised residual refinement on top of the bicubic upsample
                       of the LR image; optimises PSNR, logs SSIM, MSE and bicubic's three
``finetune.freeze_epochs`` keeps the encoder frozen at first: a new head's large, random
gradients would otherwise wash out what pretraining learned before the head is any good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import data
from platform.config import bounded, choice
from platform.data.augment import AugmentConfig
from platform.explain import vit_target
from platform.pretrained import load_matching
from platform.registry import Task, register
from platform.report import Reference
from tasks import mae, superres
from tasks._shared import class_figures, class_metrics, class_predictions, labelled_images


@dataclass
class FinetuneConfig:
    freeze_epochs: int = bounded(1, 0)  # epochs with the encoder frozen while the new head settles
    head_width: int = bounded(32, 4)  # channels of the super-resolution head's convolutions


@dataclass
class MAEFinetuneConfig:
    init_from: str = ""  # the mae run: an MLflow run id, models:/mae/<version|latest>, or a best_model.pt path
    head: str = choice("classification", ["classification", "superres"])
    model: mae.MAEModelConfig = field(default_factory=mae.MAEModelConfig)  # the encoder; from the init_from run
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    degrade: superres.DegradeConfig = field(default_factory=superres.DegradeConfig)  # head=superres: LR from HR
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class SuperresHead(nn.Module):
    """Patch tokens + LR image -> HR image: bicubic upsample plus a learned residual that starts at zero."""

    def __init__(self, dim: int, patch_size: int, width: int, factor: int):
        super().__init__()
        self.factor = factor
        # One token holds a patch_size x patch_size patch: PixelShuffle lays its channels back out as pixels.
        self.to_pixels = nn.Sequential(nn.Conv2d(dim, width * patch_size**2, 1), nn.PixelShuffle(patch_size))
        self.refine = nn.Sequential(
            nn.Conv2d(width + 1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )
        # Zero residual at the start: the head begins exactly at bicubic and can only learn to beat it.
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, tokens: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        hr_size = (lr.shape[-2] * self.factor, lr.shape[-1] * self.factor)
        b, n, d = tokens.shape  # (B, L, D)
        grid = int(round(n**0.5))
        features = self.to_pixels(tokens.transpose(1, 2).reshape(b, d, grid, grid))  # (B, W, img, img)
        features = F.interpolate(features, size=hr_size, mode="bilinear", align_corners=False)  # (B, W, H, W)
        base = superres.bicubic(lr, self.factor)  # (B, 1, H, W)
        return base + self.refine(torch.cat([features, base], dim=1))  # (B, 1, H, W)


class ClassifierHead(nn.Sequential):
    """Patch tokens -> class logits: mean-pooled, normalised, one linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.mean(dim=1))  # (B, K)


class FinetuneNet(nn.Module):
    """The mae encoder (its decoder frozen and unused) under a head that reads its patch tokens."""

    def __init__(self, encoder: mae.MaskedAutoencoder, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head
        encoder.freeze_decoder()  # only the encoder is fine-tuned
        # The current step's freeze (a train step sets it): every forward of the step keeps the encoder
        # as frozen as the step's own, the target batch of domain adaptation (adapt.method) included.
        self.frozen = False

    def encode(self, images: torch.Tensor, frozen: bool) -> torch.Tensor:
        size = self.encoder.patch_embed.img_size
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        if frozen:  # no graph through the encoder: its weights get no gradient, not even weight decay
            with torch.no_grad():
                return self.encoder.forward_tokens(images)  # (B, L, D)
        return self.encoder.forward_tokens(images)  # (B, L, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images, self.frozen and self.training), images)  # (B, K) or (B, 1, H, W)


def build_model(cfg) -> FinetuneNet:
    encoder = mae.build_model(cfg)
    dim, patch = encoder.cls_token.shape[-1], encoder.patch_embed.patch_size[0]
    if cfg.head == "superres":
        return FinetuneNet(encoder, SuperresHead(dim, patch, cfg.finetune.head_width, cfg.degrade.factor))
    return FinetuneNet(encoder, ClassifierHead(dim, len(cfg.data.classes)))


def init_weights(model: FinetuneNet, state: dict, cfg) -> list[str]:
    """The mae run's encoder (its whole state; the decoder is ignored), or an earlier fine-tuning run's."""
    if any(k.startswith("encoder.") for k in state):  # a mae_finetune checkpoint: its head may fit too
        return load_matching(model, state)
    return ["head." + k for k in model.head.state_dict()] + [
        "encoder." + k for k in load_matching(model.encoder, state)]


def freeze_for(model, batch: dict, cfg) -> None:
    """Whether this step keeps the encoder frozen: the first ``finetune.freeze_epochs`` epochs."""
    net = getattr(model, "module", model)  # a train step gets the DDP wrapper on several workers
    net.frozen = batch.get("epoch", cfg.finetune.freeze_epochs) < cfg.finetune.freeze_epochs


def embed(model: FinetuneNet, images: torch.Tensor) -> torch.Tensor:
    return model.encode(images, frozen=True).mean(dim=1)  # (B, D)


# head=classification: macro AUC over no / sphere / vortex.

def classifier_step(model, batch: dict, cfg) -> dict:
    freeze_for(model, batch, cfg)
    logits = model(batch["image"])  # (B, K)
    return {"loss": F.cross_entropy(logits.float(), batch["label"])}


def classifier_eval(model, batch: dict, cfg) -> dict:
    logits = model(batch["image"]).float()  # (B, K)
    return {"probs": logits.softmax(dim=1), "label": batch["label"]}


# head=superres: PSNR against the HR image, bicubic's beside it.

def superres_step(model, batch: dict, cfg) -> dict:
    freeze_for(model, batch, cfg)
    sr = model(batch["lr"])  # (B, 1, H, W)
    return {"loss": F.l1_loss(sr.float(), batch["hr"])}


def superres_eval(model, batch: dict, cfg) -> dict:
    sr = model(batch["lr"]).float()  # (B, 1, H, W)
    return superres.superres_metrics(sr, batch["hr"], batch["lr"], cfg.degrade.factor)


def superres_plots(model, batch: dict, outputs: dict, cfg) -> dict:
    with torch.no_grad():
        sr = model(batch["lr"]).float()  # (B, 1, H, W)
    return superres.superres_plots(batch["lr"], sr, batch["hr"], cfg.degrade.factor)


def published(metric: str, value: float, definition: str, model: str) -> Reference:
    return Reference(metric, value, definition, model,
                     "simulated DeepLense benchmark (no_sub / cdm / axion, about 30,000 images per class)",
                     "split not stated in the abstract", "Prasha et al. 2025, arXiv:2512.06642",
                     "https://arxiv.org/abs/2512.06642")


# What both heads share: the config, the encoder from the mae run and its frozen warm-up.
COMMON = dict(
    name="mae_finetune",
    config=MAEFinetuneConfig,
    build_model=build_model,
    mode="max",
    init_weights=init_weights,
    find_unused_parameters=True,  # the encoder gets no gradient while frozen
    inherit={"model.": "model."},  # the encoder's size, from the mae run's parameters
    random_init={"finetune.freeze_epochs": 0},  # train.compare_random_init: nothing to protect from the new head
    defaults={"train.lr": 5e-4},
    description="fine-tune the mae encoder: classification or super-resolution head",
)

register(Task(
    **COMMON,
    when=("head", "classification"),
    build_data=data.substructure,
    collate=lambda batch, cfg, training: labelled_images(batch, cfg.augment, training),  # image, label (B,)
    train_step=classifier_step,
    eval_step=classifier_eval,
    evaluate=class_metrics,
    metric="auc_macro",
    plots=lambda model, batch, outputs, cfg: class_figures(outputs, cfg),
    gradcam=lambda model, cfg: vit_target(model, model.encoder.blocks, model.encoder.patch_embed.grid_size),
    embed=lambda model, batch, cfg: embed(model, batch["image"]),
    class_head=lambda model: model.head[1],  # the linear layer after the pooled tokens' LayerNorm
    predict=lambda model, images, cfg: class_predictions(model(images), cfg),
    references=(
        published("auc_macro", 0.968, "macro one-vs-rest ROC AUC, 3 classes (accuracy 88.65%)",
                  "ViT, MAE-pretrained at a 90% mask ratio, fine-tuned"),
        published("auc_macro", 0.957, "macro one-vs-rest ROC AUC, 3 classes (accuracy 82.46%)",
                  "the same ViT trained from scratch")),
))

register(Task(
    **COMMON,
    when=("head", "superres"),
    build_data=superres.build_data,
    collate=superres.collate,
    train_step=superres_step,
    eval_step=superres_eval,
    evaluate=superres.evaluate,
    metric="psnr",
    plots=superres_plots,
    embed=lambda model, batch, cfg: embed(model, batch["lr"]),
    predict=lambda model, images, cfg: {"sr": model(images).float()},  # (B, 1, H, W) from LR images
    input_example=lambda batch: batch["lr"][:2].numpy(),
    references=(
        published("psnr", 33.0, "PSNR (dB), about; SSIM 0.961; 16x16 -> 64x64", "ViT, MAE-pretrained, super-resolution head"),),
))
