"""What a trained model looks at and how it arranges the data: Grad-CAM heatmaps and a 2-D map
of its embeddings, logged as figures of the run that trained it.

A task says where to look: ``Task.gradcam`` gives the classifier and its target layer (a ViT
with the reshape transform that lays its tokens back out as a grid), ``Task.embed`` the
encoder's features and ``Task.embedding_colour`` the column that colours them (the class, or a
truth parameter such as ``theta_e``). Grad-CAM is pytorch-grad-cam's; the map is scikit-learn's
t-SNE after a PCA to at most 50 dimensions.

Both are computed once per run, on its best weights, over ``plots.samples`` validation images
chosen by ``ViewRows``: as even over the classes as the split allows (a lens finder's few lenses
are all shown, not the two or three among its first 256 images), each class's first in the
order rank 0 reads them: on one worker, with the split in Ray's object store (the default for
small splits), the same images for every run and trial of a sweep; under DDP rank 0's share;
streamed through Ray Data, in the order the pipeline yields them. A binary finder's image counts
as predicted a lens above the run's own decision threshold (``Task.threshold_metric`` at the best epoch).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from platform.plots import pyplot



def decision_threshold(task, best_metrics: dict) -> float:
    """A binary finder's threshold at its best epoch (``Task.threshold_metric``); 0.5 for the rest."""
    value = best_metrics.get(f"val/{task.threshold_metric}") if task.threshold_metric else None
    return value if value is not None and math.isfinite(value) else 0.5


@dataclass
class ViewRows:
    """The validation rows the views are drawn on, collected batch by batch as a split is read.

    ``total`` rows, as even over the ``num_classes`` classes as the split allows: each class its
    share (``total / num_classes``), its first rows in reading order, and the classes with rows to
    spare filling in for those with fewer. Rows without a label: the first ``total``. Every class
    keeps at most ``total`` rows while reading, and reading may stop once ``full``.
    """

    total: int
    num_classes: int
    kept: dict = field(default_factory=dict)  # class (-1: unlabelled) -> [(positions (n,), numpy batch)]
    counts: dict = field(default_factory=dict)  # class -> rows kept
    seen: int = 0  # rows read so far: positions in reading order

    @property
    def full(self) -> bool:
        """Whether more rows can change the choice: each class already has its share."""
        if -1 in self.counts:
            return self.counts[-1] >= self.total
        share = math.ceil(self.total / max(self.num_classes, 1))
        return len(self.counts) == self.num_classes and min(self.counts.values()) >= share

    def add(self, batch: dict) -> None:
        n = len(next(iter(batch.values())))
        labels = np.asarray(batch["label"]).astype(np.int64) if "label" in batch else np.full(n, -1)
        for k in np.unique(labels):
            rows = np.flatnonzero(labels == k)[:self.total - self.counts.get(int(k), 0)]  # (m,)
            if len(rows):
                self.kept.setdefault(int(k), []).append((self.seen + rows, {c: v[rows] for c, v in batch.items()}))
                self.counts[int(k)] = self.counts.get(int(k), 0) + len(rows)
        self.seen += n

    def rows(self) -> dict:
        """The chosen rows as one numpy batch, in reading order ({} if none were read)."""
        if not self.kept:
            return {}
        shares, left = {}, self.total
        share = math.ceil(self.total / max(self.num_classes, 1))
        # Water-filling, the scarcest class first; a class with its share counts as having just
        # that, so rows read after ``full`` never change the choice.
        for i, k in enumerate(sorted(self.counts, key=lambda k: (min(self.counts[k], share), k))):
            shares[k] = min(self.counts[k], left // (len(self.counts) - i))
            left -= shares[k]
        chosen = []  # (positions (m,), numpy batch) of each class's first rows
        for k, parts in self.kept.items():
            positions = np.concatenate([p for p, _ in parts])[:shares[k]]
            chosen.append((positions, {c: np.concatenate([b[c] for _, b in parts])[:shares[k]] for c in parts[0][1]}))
        order = np.argsort(np.concatenate([p for p, _ in chosen]), kind="stable")  # back to reading order
        return {c: np.concatenate([b[c] for _, b in chosen])[order] for c in chosen[0][1]}

    def feed(self, batches: Iterable[dict]) -> "ViewRows":
        """Add ``batches`` until ``full``; returns itself."""
        for batch in batches:
            if self.full:
                break
            self.add(batch)
        return self


def view_rows(cfg, total: int) -> ViewRows:
    """The rows to draw a run's views on, spread over the classes of its data (``data.classes``)."""
    return ViewRows(total, len(cfg.data.classes))


@dataclass
class GradCamTarget:
    """What Grad-CAM explains: ``model`` maps images (B, C, H, W) to class logits (B, K), or to one
    logit (B, 1) for a binary finder; ``layers`` are the modules whose activations it weighs."""

    model: nn.Module
    layers: list
    reshape_transform: Optional[Callable] = None  # a ViT's tokens (B, P+L, D) -> (B, D, h, w)
    # (H, W) of the images -> the layers for that size, when the size decides (a CNN's stage)
    layers_for: Optional[Callable] = None


class Logits(nn.Module):
    """A model whose forward returns more than logits (a tuple, a dict), seen as one that returns them."""

    def __init__(self, model: nn.Module, pick: Callable):
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(images))


def tokens_to_map(grid: tuple[int, int], prefix_tokens: int) -> Callable:
    """A ViT's block output (B, prefix + h*w, D) -> (B, D, h, w), the cls (and register) tokens dropped."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        return tokens[:, prefix_tokens:, :].reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)

    return reshape


def vit_target(model: nn.Module, blocks, grid: tuple[int, int], prefix_tokens: int = 1) -> GradCamTarget:
    """The last block's first norm: the usual Grad-CAM layer of a ViT (its output still varies
    per token; the final norm's gradient reaches only the pooled or cls token)."""
    return GradCamTarget(model, [blocks[-1].norm1], tokens_to_map(tuple(grid), prefix_tokens))


MIN_GRID = 8  # the coarsest heatmap worth drawing: 8x8 cells over the image


def timm_target(model: nn.Module, backbone: Optional[nn.Module] = None) -> GradCamTarget:
    """``model``'s Grad-CAM target where ``backbone`` (default: ``model`` itself) is a timm model.

    A CNN: its deepest feature stage whose map is still at least 8x8 for the images at hand
    (a ResNet's ``layer4`` is 2x2 on 64x64 lensing images, a heatmap of quadrants; ``layer2``
    is 8x8 there, ``layer3`` 10x10 on 150x150). A timm ViT: its last block, as a patch grid.
    """
    backbone = backbone if backbone is not None else model
    if hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed"):
        return vit_target(model, backbone.blocks, backbone.patch_embed.grid_size,
                          getattr(backbone, "num_prefix_tokens", 1))
    stages = backbone.feature_info  # [{"module": "layer1", "reduction": 4}, ...], shallow to deep

    def layers_for(size: tuple[int, int]) -> list:
        fine = [s for s in stages if min(size) / s["reduction"] >= MIN_GRID] or stages[:1]
        return [backbone.get_submodule(fine[-1]["module"])]

    return GradCamTarget(model, [backbone.get_submodule(stages[-1]["module"])], layers_for=layers_for)


def timm_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled features before its classifier: (B, C, H, W) -> (B, D)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) in [0, 1]: the bands averaged, stretched to the image's own range."""
    image = image.mean(axis=0)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def predictions(logits: torch.Tensor, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its probability) per image; one logit is a binary finder, class 1 above ``threshold``."""
    logits = logits.float()
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0])
        predicted = (positive > threshold).long()
        return predicted.cpu().numpy(), torch.where(predicted == 1, positive, 1 - positive).cpu().numpy()
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    return predicted.cpu().numpy(), confidence.cpu().numpy()


def pick_examples(labels: np.ndarray, predicted: np.ndarray, classes: list[str], per_class: int) -> dict:
    """{(class, correct?): [row indices]}: the first ``per_class`` correctly classified and the first
    ``per_class`` misclassified images of each true class, in the split's order."""
    chosen = {}
    for k in range(len(classes)):
        for correct in (True, False):
            rows = np.flatnonzero((labels == k) & ((predicted == k) == correct))
            chosen[k, correct] = rows[:per_class].tolist()
    return chosen


def gradcam_maps(target: GradCamTarget, images: torch.Tensor, explained: np.ndarray) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] of images (N, C, H, W), each for its class in ``explained``."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

    with torch.no_grad():
        binary = target.model(images[:1]).shape[1] == 1
    as_target = BinaryClassifierOutputTarget if binary else ClassifierOutputTarget
    images = images.detach().clone().requires_grad_(True)  # gradients flow even through a frozen encoder
    layers = target.layers_for(tuple(images.shape[-2:])) if target.layers_for else target.layers
    with torch.enable_grad(), GradCAM(model=target.model, target_layers=layers,
                                      reshape_transform=target.reshape_transform) as cam:
        return cam(input_tensor=images, targets=[as_target(int(k)) for k in explained])


def gradcam_figure(target: GradCamTarget, images: torch.Tensor, labels: np.ndarray, classes: list[str],
                   per_class: int, threshold: float = 0.5):
    """One row per true class: up to ``per_class`` correct, then up to ``per_class`` misclassified
    images, each under the heatmap of the class the model predicted for it (a binary finder's
    class 1 above ``threshold``)."""
    target.model.eval()
    predicted, confidence, binary = [], [], False
    with torch.no_grad():
        for start in range(0, len(images), 64):  # until every class has its correct and misclassified examples
            logits = target.model(images[start:start + 64])  # (n, K), or (n, 1) for a binary finder
            binary = logits.shape[1] == 1
            p, c = predictions(logits, threshold)
            predicted.append(p)
            confidence.append(c)
            seen = np.concatenate(predicted)
            if all(len(v) == per_class for v in pick_examples(labels[:len(seen)], seen, classes, per_class).values()):
                break
    predicted, confidence = np.concatenate(predicted), np.concatenate(confidence)
    labels = labels[:len(predicted)]
    chosen = pick_examples(labels, predicted, classes, per_class)
    order = [i for rows in chosen.values() for i in rows]
    heat = dict(zip(order, gradcam_maps(target, images[order], predicted[order]))) if order else {}

    shown = images.detach().float().cpu().numpy()
    columns, header_in = 2 * per_class, 0.75  # inches above the images: the title, then the two column headings
    height = 1.9 * len(classes) + header_in
    figure, axes = pyplot().subplots(len(classes), columns, figsize=(1.7 * columns, height), squeeze=False)
    for k, name in enumerate(classes):
        for correct in (True, False):
            rows = chosen[k, correct]
            for slot in range(per_class):
                ax = axes[k, slot + (0 if correct else per_class)]
                ax.set_xticks([])
                ax.set_yticks([])
                if slot >= len(rows):
                    ax.set_frame_on(False)
                    if slot == 0:  # an empty row half says so, rather than look like a missing figure
                        ax.text(0.5, 0.5, "none among\nthese images", ha="center", va="center", fontsize=8,
                                color="gray", transform=ax.transAxes)
                    continue
                i = rows[slot]
                ax.imshow(_display(shown[i]), cmap="gray")
                ax.imshow(heat[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                verdict = "" if correct else f"as {classes[predicted[i]]} "
                ax.set_title(f"{verdict}{confidence[i]:.2f}", fontsize=8, color="green" if correct else "red")
        axes[k, 0].set_ylabel(f"true {name}")
    # Laid out below a band kept for the headings, so that they never run into each other or the
    # images' titles, whatever the number of rows.
    figure.tight_layout(rect=(0, 0, 1, 1 - header_in / height))
    rule = f"; {classes[-1]} above p={threshold:.3g}, the run's decision threshold" if binary else ""
    figure.suptitle(f"Grad-CAM: where the predicted class's evidence lies (probability above each image{rule})",
                    fontsize=9, y=1 - 0.12 / height, va="top")
    for correct, column in ((True, 0), (False, per_class)):
        figure.text(axes[0, column].get_position().x0, 1 - 0.42 / height, "correct" if correct else "misclassified",
                    fontsize=10, weight="bold", va="top")
    return figure


def project_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): PCA to at most 50 dimensions (t-SNE's cost grows with them), then t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    components = min(50, features.shape[1], n - 1)
    reduced = PCA(n_components=components, random_state=seed).fit_transform(features) if components < features.shape[1] else features
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    # 500 iterations (sklearn's default is 1000): a few hundred points have settled by then, in half the time.
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
                random_state=seed).fit_transform(reduced)


def embedding_figure(points: np.ndarray, colour: Optional[np.ndarray], colour_by: str,
                     classes: Optional[list[str]]):
    """The 2-D map, coloured by class (a legend) or by a truth parameter (a colour bar)."""
    figure, ax = pyplot().subplots(figsize=(5, 4.4))
    if colour is None:
        ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.7)
    elif classes is not None:
        for k, name in enumerate(classes):
            here = colour.astype(np.int64) == k
            ax.scatter(points[here, 0], points[here, 1], s=8, alpha=0.7, label=f"{name} ({int(here.sum())})")
        ax.legend(loc="best", fontsize=8)
    else:
        dots = ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.8, c=colour, cmap="viridis")
        figure.colorbar(dots, ax=ax, label=colour_by)
    ax.set(xticks=[], yticks=[], title=f"validation embeddings (t-SNE, {len(points)} images), by {colour_by}")
    ax.title.set_fontsize(9)
    figure.tight_layout()
    return figure


def wanted(task, cfg) -> bool:
    """Whether a run of this task and config draws any view: the task can, and ``plots.*`` asks."""
    return bool((cfg.plots.gradcam and task.gradcam) or (cfg.plots.embeddings and task.embed))


def log_views(client, run_id: str, make_model: Callable, task, cfg, rows: dict, device: torch.device,
              threshold: float = 0.5) -> tuple[list[str], Optional[str]]:
    """Draw the views of ``make_model()`` (the best weights, a model the caller hands over) and log
    them on the run, tagged ``platform.views``. Returns (the figures' names, None), or ([], why) in one
    line, tagged ``platform.views_error``: a figure must never fail a run whose training succeeded.
    ``threshold``: a binary finder's decision threshold (``Task.threshold_metric`` at the best epoch)."""
    from platform import tracking

    try:
        figures = model_views(make_model(), task, cfg, rows, device, threshold)
        tracking.log_figures(client, run_id, figures)
        tracking.set_tags(client, run_id, {tracking.VIEWS_TAG: ",".join(figures) or "none"})
        return list(figures), None
    except Exception as error:
        why = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        tracking.set_tags(client, run_id, {"platform.views_error": why})
        return [], why


def log_best_views(client, run_id: str, task, cfg, model: nn.Module, best_state: dict | None, rows: dict,
                   device: torch.device, threshold: float = 0.5) -> None:
    """The views of a run's best weights over ``rows``, once, at its end; what happened on its console."""
    from platform import console, tracking

    if not wanted(task, cfg) or best_state is None:
        return

    def best_model():
        best = copy.deepcopy(model)
        best.load_state_dict(best_state)
        return best

    started = time.perf_counter()
    figures, why = log_views(client, run_id, best_model, task, cfg, rows, device, threshold)
    if why:
        tracking.say(f"[{cfg.task}] warning: Grad-CAM / embedding figures failed ({why}); the run goes on")
    elif figures and not console.is_quiet():
        tracking.say(f"[{cfg.task}] {', '.join(figures)} of the best epoch logged in {time.perf_counter() - started:.1f}s")


def model_views(model: nn.Module, task, cfg, rows: dict, device: torch.device, threshold: float = 0.5) -> dict:
    """{"gradcam.png", "embeddings.png"} as the task and ``plots.*`` ask, for ``model`` (its best
    weights, a copy the caller owns: it is put in eval mode) on ``rows``, a numpy batch of
    validation rows; ``threshold``: a binary finder's decision threshold."""
    figures = {}
    wants_gradcam = cfg.plots.gradcam and task.gradcam is not None
    wants_embeddings = cfg.plots.embeddings and task.embed is not None
    if not wanted(task, cfg) or not len(rows.get("image", ())):
        return figures
    model = model.to(device).eval()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.collate(rows, cfg, False).items()}
    classes = list(cfg.data.classes)
    labels = rows.get("label")
    if wants_gradcam and labels is not None:
        target = task.gradcam(model, cfg)
        if target is not None:
            figures["gradcam.png"] = gradcam_figure(target, batch["image"], np.asarray(labels).astype(np.int64),
                                                    classes, cfg.plots.gradcam_per_class, threshold)
    if wants_embeddings and len(rows["image"]) >= 5:
        step = cfg.train.batch_size
        with torch.no_grad():
            chunks = [task.embed(model, {k: v[i:i + step] for k, v in batch.items()}, cfg).float().cpu()
                      for i in range(0, len(rows["image"]), step)]
        features = torch.cat(chunks).reshape(len(rows["image"]), -1).numpy()  # (N, D)
        colour_by = task.embedding_colour
        colour = np.asarray(rows[colour_by]) if colour_by in rows else None
        figures["embeddings.png"] = embedding_figure(
            project_2d(features, cfg.train.seed), colour, colour_by if colour is not None else "nothing",
            classes if colour_by == "label" else None)
    return figures
