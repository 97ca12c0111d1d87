"""Augmentations that respect lensing physics: the sky has no preferred orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from platform.config import bounded
from platform.data.shards import decode_images


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


def batch_images(batch: dict, augment: AugmentConfig, training: bool):
    """A Parquet batch's images as a float32 tensor (B, C, H, W), with dihedral augmentation when training."""
    import torch

    images = decode_images(batch)  # (B, C, H, W), read-only view of the Parquet bytes
    if training and augment.strength > 0:
        # Drawn from NumPy's global generator, which the loop seeds per worker: reproducible runs.
        images = dihedral(images, augment.strength, np.random.default_rng(np.random.randint(2**31 - 1)))
    return torch.from_numpy(np.array(images))
