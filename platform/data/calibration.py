"""What a set of images looks like, in the figures that tell simulated cutouts from real ones, and the
ranges the calibrated simulator presets must reach.

    stats = image_statistics(images, labels, class_names)   # images (N, C, H, W) in the files' units
    for row in compare(stats, "hsc"): print(row)

The figures are those measured on the real DeepLense files (``../shared/DESIGN.md``):
- normalisation: each image's (or band's) minimum and maximum;
- the sky: per band, the median over images of each image's sigma-clipped background level, and of
  its robust noise (1.4826 median absolute deviations, after clipping);
- light at the centre: the share of the central 24x24 pixels above background + 5 sigma, per class;
- where the brightest pixel is: the share of images whose brightest pixel (bands summed) lies within
  5 px of the centre, per class;
- neighbours: the share of the pixels outside the centre above background + 5 sigma;
- rings (substructure images): the median distance from the centre of the pixels above background +
  5 sigma, per image (its median and 10th and 90th percentiles over images).

``python -m platform.data`` prints them for the training split, beside the preset's targets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CENTRE = 24  # px: the central box of the lens-finding figures
NEAR_CENTRE = 5.0  # px
BRIGHT_SIGMA = 5.0
CLIP_SIGMA, CLIP_ROUNDS = 3.0, 5


@dataclasses.dataclass(frozen=True)
class Target:
    """A figure's accepted range. ``per_band``: every band's value must lie in it; ``of_class``: the
    figure of that class's images only."""

    figure: str
    low: float
    high: float
    of_class: str | None = None
    per_band: bool = True
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.figure}[{self.of_class}]" if self.of_class else self.figure


HSC = "real HSC-SSP cutouts of the DeepLense lens-finding set"
TEST1 = "DeepLense Common Test I (shared/DESIGN.md)"
TARGETS: dict[str, tuple[Target, ...]] = {
    "hsc": (
        Target("min", 0.0, 0.0, source=HSC + ": every band min-max normalised"),
        Target("max", 1.0, 1.0, source=HSC),
        Target("background", 0.07, 0.21, source=HSC),
        Target("noise", 0.02, 0.07, source=HSC),
        Target("bright_centre", 0.33, 0.56, of_class="lenses", source=HSC),
        Target("bright_centre", 0.05, 0.16, of_class="nonlenses", source=HSC),
        # 90% and 60% on the real files; the ranges allow for the sampling error of a few hundred images.
        Target("brightest_near_centre", 0.82, 0.97, of_class="lenses", per_band=False, source=HSC + ": 90%"),
        Target("brightest_near_centre", 0.50, 0.70, of_class="nonlenses", per_band=False, source=HSC + ": 60%"),
        Target("neighbours", 0.01, 0.03, source=HSC),
    ),
    "test1": (
        Target("min", 0.0, 0.0, source=TEST1 + ": min-max normalised per image"),
        Target("max", 1.0, 1.0, source=TEST1),
        Target("background", 0.005, 0.02, source=TEST1 + ": about 0.01"),
        Target("noise", 0.0015, 0.006, source=TEST1 + ": about 0.003"),
        Target("ring_radius", 20.0, 26.0, per_band=False, source=TEST1 + ": median about 23 px"),
        Target("ring_radius_p10", 13.0, 20.0, per_band=False, source=TEST1 + ": radii from 15 px"),
        Target("ring_radius_p90", 26.0, 35.0, per_band=False, source=TEST1 + ": radii up to 33 px"),
    ),
}


def sky(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background, noise), each (N, C): the sigma-clipped median and robust sigma of every image's band."""
    flat = images.reshape(*images.shape[:2], -1).astype(np.float64)  # (N, C, P)
    keep = np.ones(flat.shape, dtype=bool)
    for _ in range(CLIP_ROUNDS):
        values = np.where(keep, flat, np.nan)
        level = np.nanmedian(values, axis=-1, keepdims=True)
        sigma = 1.4826 * np.nanmedian(np.abs(values - level), axis=-1, keepdims=True)
        keep = np.abs(flat - level) <= CLIP_SIGMA * np.maximum(sigma, 1e-12)
    return level[..., 0], sigma[..., 0]


def image_statistics(images: np.ndarray, labels: np.ndarray | None = None,
                     class_names: tuple[str, ...] = ()) -> dict[str, np.ndarray | float]:
    """The figures of ``images`` (N, C, H, W): per band (C,) arrays, or one number, with ``[class]``
    variants of the per-class ones when ``labels`` and ``class_names`` are given."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    background, noise = sky(images)  # (N, C)
    bright = images > (background + BRIGHT_SIGMA * np.maximum(noise, 1e-12))[:, :, None, None]  # (N, C, H, W)
    top, left = (h - CENTRE) // 2, (w - CENTRE) // 2
    centre = np.zeros((h, w), dtype=bool)
    centre[top:top + CENTRE, left:left + CENTRE] = True
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)  # (H, W), px from the image's centre
    brightest = images.sum(axis=1).reshape(n, -1).argmax(axis=1)  # (N,)
    per_image = {
        "min": images.min(axis=(2, 3)),
        "max": images.max(axis=(2, 3)),
        "background": background,
        "noise": noise,
        "bright_centre": bright[:, :, centre].mean(axis=-1),  # (N, C)
        "neighbours": bright[:, :, ~centre].mean(axis=-1),
        "brightest_near_centre": (radius.reshape(-1)[brightest] <= NEAR_CENTRE).astype(np.float64),  # (N,)
    }
    stats: dict[str, np.ndarray | float] = {}
    for name, values in per_image.items():
        stats[name] = _summary(name, values)
        if labels is not None:
            for label, class_name in enumerate(class_names):
                rows = np.asarray(labels) == label
                if rows.any():
                    stats[f"{name}[{class_name}]"] = _summary(name, values[rows])
    # A ring's radius: the median distance from the centre of its bright pixels (any band).
    lit = (bright.any(axis=1) & ~_touches_edge(h, w)).reshape(n, -1)  # (N, H*W)
    rings = np.array([np.median(radius.reshape(-1)[row]) for row in lit if row.any()])
    if len(rings):
        stats["ring_radius"] = float(np.median(rings))
        stats["ring_radius_p10"] = float(np.percentile(rings, 10))
        stats["ring_radius_p90"] = float(np.percentile(rings, 90))
    return stats


def _summary(name: str, values: np.ndarray) -> np.ndarray | float:
    """Over images: a level's median (the sky), a share's mean (how often, how much)."""
    if name in ("background", "noise"):
        return np.median(values, axis=0)
    if name in ("min", "max"):
        return np.median(values, axis=0)
    return np.mean(values, axis=0) if values.ndim == 2 else float(np.mean(values))


def _touches_edge(h: int, w: int, border: int = 2) -> np.ndarray:
    edge = np.zeros((h, w), dtype=bool)
    edge[:border], edge[-border:], edge[:, :border], edge[:, -border:] = True, True, True, True
    return edge


@dataclasses.dataclass(frozen=True)
class Row:
    target: Target
    value: np.ndarray | float | None  # None: the figure could not be measured (no image of the class)

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        values = np.atleast_1d(self.value) if self.target.per_band else np.atleast_1d(np.mean(self.value))
        tolerance = 1e-6  # min 0 / max 1 exactly, up to float32 rounding
        return bool(np.all((values >= self.target.low - tolerance) & (values <= self.target.high + tolerance)))

    def __str__(self) -> str:
        shown = "n/a" if self.value is None else " ".join(f"{v:.3g}" for v in np.atleast_1d(self.value))
        span = f"{self.target.low:g}" if self.target.low == self.target.high else f"{self.target.low:g}-{self.target.high:g}"
        return f"{'ok ' if self.ok else 'OFF'} {self.target.key:<32} {shown:<24} target {span}"


def compare(stats: dict, preset: str) -> list[Row]:
    """Each of ``preset``'s targets beside the measured figure; [] for a preset with none."""
    return [Row(t, stats.get(t.key)) for t in TARGETS.get(preset, ())]


def report(stats: dict, preset: str | None, bands: tuple[str, ...] = ()) -> list[str]:
    """The lines ``python -m platform.data`` prints: the figures, and the targets when the preset has them."""
    lines = [f"image statistics{' (bands ' + ' '.join(bands) + ')' if bands else ''}, "
             f"beside the targets of preset {preset}:" if preset in TARGETS else "image statistics:"]
    if preset in TARGETS:
        lines += [f"  {row}" for row in compare(stats, preset)]
    else:
        lines += [f"  {key:<36} {' '.join(f'{v:.3g}' for v in np.atleast_1d(value))}" for key, value in stats.items()]
    return lines
