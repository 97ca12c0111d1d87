"""Lens finding (DeepLense Test II): galaxies in three bands, a few of them strong lenses.

    images, truth = simulate_lenses(n=2000, positive_fraction=1 / 17, seed=0)  # (n, 3, 64, 64)

Every image holds a red foreground elliptical (Sersic n=4) and a small blue star-forming
background galaxy (Sersic n=1). In a lens (label 1) the background galaxy sits behind
the foreground one, whose SIE mass plus external shear bends it into arcs or a ring at
theta_E; in a non-lens (label 0) it sits well away, unlensed. So colour alone does not
tell the classes apart: the arcs' shape does. Each band has its own PSF and noise, and
each image is scaled by its peak over the three bands, which keeps the colours.

Deterministic from (n, positive_fraction, seed), in fixed blocks like ``simulate``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from platform import lensing
from platform.data.simulate import SEED_BLOCK, _block_generator, render_batch

CLASS_NAMES = ("nonlenses", "lenses")  # label 1 is a lens
BANDS = ("g", "r", "i")
N_PIX, PIXEL_SCALE = 64, 0.2  # arcsec / pixel: a 12.8" field, ground-based survey-like
LENS_COLOUR = (0.35, 0.7, 1.0)  # g, r, i flux of the red elliptical
SOURCE_COLOUR = (1.0, 0.8, 0.55)  # of the blue background galaxy
PSF_FWHM = ((0.8, 1.1), (0.7, 1.0), (0.6, 0.9))  # arcsec, per band
VERSION = 3  # 2: fainter arcs, smaller rings, closer neighbours; 3: photon noise in its Gaussian limit under read noise


def _labels(n: int, positive_fraction: float, seed: int) -> np.ndarray:
    positives = int(round(n * positive_fraction))
    labels = np.zeros(n, dtype=np.int64)
    labels[:positives] = 1
    return np.random.default_rng(np.random.SeedSequence([seed, 0x6C656E73])).permutation(labels)  # "lens"


def _draw(b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (b,), generator=g, dtype=torch.float64)

    d = {
        "theta_e": uniform(0.5, 2.0),  # the smallest rings hide inside the PSF
        "lens_q": uniform(0.6, 0.95),
        "lens_phi": uniform(0.0, math.pi),
        "shear": uniform(0.0, 0.08),
        "shear_angle": uniform(0.0, math.pi),
        "lens_r_eff": uniform(0.6, 1.4),
        "lens_amp": uniform(0.6, 1.2),
        "source_r_eff": uniform(0.1, 0.3),
        "source_q": uniform(0.5, 1.0),
        "source_phi": uniform(0.0, math.pi),
        "source_amp": uniform(0.2, 3.0),  # down to arcs barely above the noise
        "source_radius": uniform(0.0, 1.0),  # in units of theta_E (lens) or of 3.5" beyond 1.5" (non-lens)
        "source_direction": uniform(0.0, 2 * math.pi),
        "noise_sigma": uniform(0.01, 0.03),
        "poisson_counts": uniform(200.0, 800.0),
    }
    for band in range(len(BANDS)):
        d[f"psf_fwhm_{band}"] = uniform(*PSF_FWHM[band])
    return d


def _render(d: dict[str, torch.Tensor], labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Noiseless (B, 3, H, W) images."""
    lens = labels == 1
    # Lenses: the source within ~theta_E/2 of the optical axis, so it is strongly lensed.
    # Non-lenses: 1.5-5" away, a neighbour that can sit where an arc would.
    radius = torch.where(lens, 0.5 * d["theta_e"] * d["source_radius"], 1.5 + 3.5 * d["source_radius"])
    sx, sy = radius * torch.cos(d["source_direction"]), radius * torch.sin(d["source_direction"])
    ax, ay = lensing.sie_deflection(x, y, d["theta_e"], d["lens_q"], d["lens_phi"])  # (B, H, W)
    g1, g2 = lensing.shear_components(d["shear"], d["shear_angle"])
    hx, hy = lensing.shear_deflection(x, y, g1, g2)
    on = lens.to(x.dtype)[:, None, None]  # no deflection at all for a non-lens
    bx, by = lensing.ray_trace(x, y, on * (ax + hx), on * (ay + hy))
    source = lensing.sersic(bx, by, d["source_amp"], d["source_r_eff"], 1.0, d["source_q"], d["source_phi"], sx, sy)
    foreground = lensing.sersic(x, y, d["lens_amp"], d["lens_r_eff"], 4.0, d["lens_q"], d["lens_phi"], 0.0, 0.0)
    bands = []
    for band in range(len(BANDS)):
        kernel = lensing.gaussian_psf_kernel(d[f"psf_fwhm_{band}"], PIXEL_SCALE, 15, dtype=x.dtype)  # (B, 15, 15)
        light = LENS_COLOUR[band] * foreground + SOURCE_COLOUR[band] * source  # (B, H, W)
        bands.append(lensing.convolve_fft(light, kernel))
    images = torch.stack(bands, dim=1)  # (B, 3, H, W)
    return images / images.amax(dim=(-3, -2, -1), keepdim=True).clamp(min=1e-30)


def simulate_lenses(n: int, positive_fraction: float, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n images (n, 3, 64, 64) float32 with about ``positive_fraction`` lenses, and truth columns.

    Truth: label (1 = lens), theta_e (arcsec; 0 for a non-lens), source_x, source_y (arcsec).
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    labels = _labels(n, positive_fraction, seed)
    images = np.empty((n, len(BANDS), N_PIX, N_PIX), dtype=np.float32)
    truth = {"label": labels, **{k: np.zeros(n, dtype=np.float32) for k in ("theta_e", "source_x", "source_y")}}
    x, y = lensing.pixel_grid(N_PIX, PIXEL_SCALE, dtype=torch.float32)  # (H, W)
    from platform.data.shards import progress

    with torch.inference_mode(), progress(n, f"simulating lens_finding (seed {seed})") as bar:
        for block, start in enumerate(range(0, n, SEED_BLOCK)):
            stop = min(start + SEED_BLOCK, n)
            g = _block_generator(seed, "lens_finding", block)
            d = {k: v.float() for k, v in _draw(stop - start, g).items()}
            lab = torch.from_numpy(labels[start:stop])
            clean = torch.empty(stop - start, len(BANDS), N_PIX, N_PIX)
            step = render_batch(N_PIX, len(BANDS))
            for i in range(0, stop - start, step):
                j = min(i + step, stop - start)
                clean[i:j] = _render({k: v[i:j] for k, v in d.items()}, lab[i:j], x, y)
            noisy = lensing.add_noise(clean, g, poisson_scale=d["poisson_counts"], gaussian_sigma=d["noise_sigma"])
            images[start:stop] = noisy.clamp(min=0).numpy()
            lens = labels[start:stop] == 1
            radius = np.where(lens, 0.5 * d["theta_e"].numpy() * d["source_radius"].numpy(),
                              1.5 + 3.5 * d["source_radius"].numpy())
            truth["theta_e"][start:stop] = np.where(lens, d["theta_e"].numpy(), 0.0)
            truth["source_x"][start:stop] = radius * np.cos(d["source_direction"].numpy())
            truth["source_y"][start:stop] = radius * np.sin(d["source_direction"].numpy())
            bar.update(stop - start)
    return images, truth
