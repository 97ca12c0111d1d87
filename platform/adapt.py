"""Domain adaptation: a classifier trained on labelled simulations also sees unlabelled images of the
domain it must work on (a real survey's cutouts) and learns features that do not tell the two apart.

    python -m platform.train task=lens_finding adapt.path=/data/hsc_unlabelled adapt.method=dann

- ``dann``: domain-adversarial training (Ganin et al. 2016, JMLR 17:59). A small domain head learns
  to tell source features from target features; a gradient-reversal layer between it and the
  model makes the model's features fight it. The reversal's strength ramps from 0 to
  ``adapt.weight`` as 2 / (1 + exp(-10 p)) - 1 over the run's progress p, the paper's schedule, so
  the features learn the task before they are pulled together.
- ``coral``: Deep CORAL (Sun & Saenko 2016): the squared Frobenius distance between the source and
  the target features' covariances, over 4 d^2, times ``adapt.weight``.
- ``none``: the source-only baseline (``adapt.path`` is then not read).

The features are the input of the task's class head (``Task.class_head``), caught by a forward
hook while the task's own ``train_step`` runs, so a task needs no code for it; each step then
passes one batch of target images through the same model. The target folder is read by the same
checked readers as any data folder, never labelled, and logged with the run as its ``adapt``
dataset. ``adapt.method`` and ``adapt.weight`` are searchable like any other key.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from platform.errors import ConfigError

SPLIT = "adapt"  # the target images' split, beside train, val and test
DOMAIN_HIDDEN = 256  # the domain head's width: one hidden layer, as Ganin et al.'s digit models


def methods(cfg, space=None) -> set[str]:
    """The methods a run (``cfg``) or a sweep (``cfg`` and its search ``space``) may train with."""
    searched = space.params.get("adapt.method") if space is not None else None
    return {cfg.adapt.method} | (set(searched.args) if searched is not None and searched.kind == "choice" else set())


def adapting(cfg, space=None) -> bool:
    """Whether the target images are needed: some run of this command adapts to them."""
    return bool(methods(cfg, space) - {"none"})


def check(task, cfg, space=None) -> None:
    """A one-line error, before any work, when adaptation is asked of what cannot do it."""
    a = cfg.adapt
    method = next(iter(sorted(methods(cfg, space) - {"none"})), None)
    if method is None:
        return
    if not a.path:
        raise ConfigError(f"adapt.method={method} needs adapt.path=FOLDER: unlabelled images of the target domain "
                          f"(every .npy below it)")
    if not os.path.isdir(a.path):
        raise ConfigError(f"adapt.path={a.path} does not exist or is not a folder; expected a folder of .npy images")
    if task.class_head is None:
        from platform import registry

        able = [name for name in registry.names()
                if any(t.class_head is not None for t in registry.all_registrations(name))]
        raise ConfigError(f"adapt.method={method}: task {task.name}{_variant(task)} has no class head to adapt; "
                          f"domain adaptation is for the classifiers: {', '.join(able)}")


def splits_of(shards: dict, cfg) -> dict:
    """The splits a run of ``cfg`` reads: the target images only when it adapts to them."""
    return {split: s for split, s in shards.items() if split != SPLIT or cfg.adapt.method != "none"}


def _variant(task) -> str:
    return f" {task.when[0]}={task.when[1]}" if task.when else ""


class GradientReversal(torch.autograd.Function):
    """The identity forward; the gradient times -strength backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def domain_head(features: int) -> nn.Module:
    """(B, D) features -> (B, 1): the logit that an image is from the target domain."""
    return nn.Sequential(nn.Linear(features, DOMAIN_HIDDEN), nn.ReLU(), nn.Linear(DOMAIN_HIDDEN, 1))


def ramp(progress: float) -> float:
    """Ganin et al.'s schedule of the reversal's strength: 0 at the start, near 1 by mid-run."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL's loss between (Bs, D) and (Bt, D) features: ||C_s - C_t||_F^2 / (4 D^2)."""
    def covariance(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=0, keepdim=True)
        return x.T @ x / max(1, x.shape[0] - 1)  # (D, D)

    d = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


@dataclasses.dataclass
class Adapter:
    """One worker's adaptation: the hook on the class head's input, and DANN's domain head."""

    method: str
    weight: float
    head: nn.Module | None  # DANN's domain head (DDP-wrapped on several workers); None for CORAL
    hook: torch.utils.hooks.RemovableHandle
    caught: list = dataclasses.field(default_factory=list)  # the features of the forward passes since the last loss

    def loss(self, model: nn.Module, target_images: torch.Tensor, progress: float) -> torch.Tensor:
        """The adaptation loss of this step: the source features the task's train_step just made,
        against the target images' (one more forward pass, through the unwrapped model: DDP's
        hooks fire once, for the step's one backward)."""
        if not self.caught:
            raise RuntimeError("adapt: the task's train_step never reached its class head (Task.class_head)")
        source = self.caught[-1]  # (Bs, D)
        self.caught.clear()
        model(target_images)
        target = self.caught.pop()  # (Bt, D)
        self.caught.clear()
        source, target = source.flatten(1).float(), target.flatten(1).float()
        if self.method == "coral":
            return self.weight * coral(source, target)
        features = GradientReversal.apply(torch.cat([source, target]), self.weight * ramp(progress))
        logits = self.head(features).squeeze(1).float()  # (Bs + Bt,)
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, domains)


def build(task, cfg, model: nn.Module, example: torch.Tensor, prepare) -> Adapter | None:
    """The adapter of ``model`` (unwrapped), or None for ``adapt.method=none``. ``example``: a few
    images on the model's device, to learn the features' width; ``prepare``: the session's
    ``prepare_model`` (the domain head is trained with DDP like the model)."""
    if cfg.adapt.method == "none":
        return None
    class_head = task.class_head(model)
    probe = class_head.register_forward_pre_hook(lambda module, args: widths.append(args[0].flatten(1).shape[1]))
    widths: list = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was_training)
    probe.remove()
    caught: list = []

    def catch(module, args):  # training forwards only: not validation's, nor the end's Grad-CAM views
        if module.training and torch.is_grad_enabled():
            caught.append(args[0])

    hook = class_head.register_forward_pre_hook(catch)
    width = widths[-1]
    head = None
    if cfg.adapt.method == "dann":
        torch.manual_seed(cfg.train.seed + 1)  # the same initial domain head on every rank
        head = prepare(domain_head(width).to(example.device), None)
    return Adapter(method=cfg.adapt.method, weight=cfg.adapt.weight, head=head, hook=hook, caught=caught)
