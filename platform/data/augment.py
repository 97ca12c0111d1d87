"""Augmentations that respect lensing physics: the sky has no preferred orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from platform.config import bounded


@dataclass
class AugmentConfig:
    strength: float = bounded(0.5, 0.0, 1.0)  # probability of a random flip / 90-degree rotation


def dihedral(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random flips and 90-degree rotations, each image altered with probability ``strength``.

    images: (B, C, H, W) with H == W. The eight symmetries of the square leave the
    physics unchanged, so they enlarge the data without inventing anything.
    """
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < strength):
        image = np.rot90(images[i], k=int(rng.integers(4)), axes=(1, 2))  # (C, H, W)
        out[i] = image[:, :, ::-1] if rng.random() < 0.5 else image
    return out


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return images + rng.normal(0.0, sigma, size=images.shape).astype(images.dtype)
