"""Super-resolution of lensing images: SRResNet from low-resolution (LR) to high-resolution (HR) images.

    python -m platform.tune task=superres
    python -m platform.train task=superres degrade.factor=4 data.preset=model_ii model.blocks=16 model.channels=64
    python -m platform.train task=superres data.path=/data/superres      # HR/*.npy and LR/*.npy, paired by name

Simulated pairs degrade the simulator's HR images as a coarser instrument would see them:
an extra Gaussian PSF (``degrade.psf_fwhm``, arcsec), area downsampling by ``degrade.factor``
(default 2: 150 -> 75 pixels for the default preset model_i) and Gaussian read noise
(``degrade.noise_sigma``). Real pairs come from a folder of ``HR/`` and ``LR/`` .npy files
of the same names.

SRResNet (Ledig et al., 2017, "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network"), trained with an L1 loss. Optimises the validation PSNR;
also logs SSIM and MSE, the same three for bicubic upsampling of the same LR images, and
``psnr_gain`` (PSNR minus bicubic's), so the gain over bicubic is always in view.

Other tasks reuse the data and the evaluation, which know nothing of SRResNet: include
``degrade: DegradeConfig`` (and ``augment``) in a config, then call ``build_data``,
``collate``, ``superres_metrics`` in ``eval_step``, ``evaluate`` and ``superres_plots``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from platform import config as config_lib
from platform import data, lensing, metrics
from platform.config import ConfigError, bounded
from platform.data import DataError, simulate
from platform.data.augment import AugmentConfig
from platform.plots import image_rows_figure, power_spectrum_figure
from platform.registry import Task, register
from platform.report import Reference

# Bump when degrade() changes, so cached pairs are rebuilt.
DEGRADE_VERSION = 1
# Images degraded together: fixed, because FFT rounding depends on the batch.
DEGRADE_CHUNK = 256
METRICS = ("psnr", "ssim", "mse")


@dataclass
class DegradeConfig:
    factor: int = bounded(2, 2)  # HR pixels per LR pixel along each axis
    psf_fwhm: float = bounded(0.1, 0.0)  # arcsec: the LR instrument's extra Gaussian blur; 0: none
    noise_sigma: float = bounded(0.01, 0.0)  # Gaussian read noise on LR, in HR units (HR spans [0, 1])


@dataclass
class SRModelConfig:
    blocks: int = bounded(6, 1)  # residual blocks (16 in the paper)
    channels: int = bounded(32, 1)  # feature channels (64 in the paper)


@dataclass
class SuperResConfig:
    model: SRModelConfig = field(default_factory=SRModelConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=0.5))


# ---------------------------------------------------------------------------- model


def bicubic(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, factor h, factor w), the baseline every metric is compared with."""
    h, w = lr.shape[-2:]
    return F.interpolate(lr, size=(factor * h, factor * w), mode="bicubic", align_corners=False)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet: a 9x9 head, residual blocks under a global skip, x2 PixelShuffle stages, a 9x9 tail.

    Its output is added to the bicubic upsample of the input (see ``forward``).
    """

    def __init__(self, factor: int, blocks: int, channels: int, in_chans: int = 1):
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"SRResNet upsamples in x2 stages: factor must be a power of 2, got {factor}")
        self.factor = factor
        self.head = nn.Sequential(nn.Conv2d(in_chans, channels, 9, padding=4), nn.PReLU(channels))
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.body_end = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.upsample = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(channels))
            for _ in range(int(math.log2(factor)))
        ])
        self.tail = nn.Conv2d(channels, in_chans, 9, padding=4)
        # The detail enters through a scalar gate that starts at 0 (ReZero, Bachlechner et al. 2020),
        # so the untrained network is exactly bicubic. A zero-initialised tail would do that too,
        # but Adam's first steps move each of its 81 x channels weights by about lr at once, and
        # the output leaps far past the few percent of detail there is to add; the gate grows it.
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C, factor h, factor w)
        # The network predicts only what bicubic upsampling misses, added to the bicubic image:
        # the smooth bulk of the ring is free, and all the capacity goes to the detail.
        base = bicubic(lr, self.factor)  # (B, C, H, W)
        x = self.head(lr)  # (B, F, h, w)
        x = x + self.body_end(self.blocks(x))  # (B, F, h, w), the global skip
        return base + self.gate * self.tail(self.upsample(x))  # (B, C, H, W)


def build_model(cfg) -> SRResNet:
    return SRResNet(cfg.degrade.factor, cfg.model.blocks, cfg.model.channels)


# ---------------------------------------------------------------------------- data


def degrade(hr: np.ndarray, factor: int, psf_fwhm: float, noise_sigma: float, pixel_scale: float,
            seed: int) -> np.ndarray:
    """LR images (N, C, H/factor, W/factor) from HR images (N, C, H, W), as a coarser instrument sees them.

    A Gaussian PSF of FWHM psf_fwhm (arcsec, on the HR grid of pixel_scale arcsec/pixel),
    then area downsampling (each LR pixel the mean of its factor x factor HR block), then
    Gaussian noise of noise_sigma from a generator seeded by ``seed``. Every step commutes
    with the flips and right-angle rotations of a square image.
    """
    n, _, h, w = hr.shape
    if h % factor or w % factor:
        raise ValueError(f"factor {factor} does not divide the image size {h}x{w}")
    kernel = None
    if psf_fwhm > 0:
        sigma_px = psf_fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel_scale
        radius = max(1, math.ceil(4 * sigma_px))  # +-4 sigma
        kernel = lensing.gaussian_psf_kernel(psf_fwhm, pixel_scale, 2 * radius + 1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((n, hr.shape[1], h // factor, w // factor), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, DEGRADE_CHUNK):
            x = torch.from_numpy(np.array(hr[start:start + DEGRADE_CHUNK], dtype=np.float32))  # (b, C, H, W), a copy
            if kernel is not None:
                # Reflected borders: the sky goes on past the edge, and zeros there would darken it.
                padded = F.pad(x, (radius,) * 4, mode="reflect")  # (b, C, H + 2r, W + 2r)
                x = lensing.convolve_fft(padded, kernel)[..., radius:-radius, radius:-radius]  # (b, C, H, W)
            x = F.avg_pool2d(x, factor)  # (b, C, h, w)
            out[start:start + len(x)] = lensing.add_noise(x, generator, gaussian_sigma=noise_sigma).numpy()
    return out


def _simulate_pairs(preset: str, n: int, seed: int, d: DegradeConfig) -> tuple[np.ndarray, dict]:
    hr, truth = simulate.simulate(preset, n, seed)  # (n, 1, H, W) in [0, 1]
    noise_seed = int(np.random.SeedSequence([seed, 0x5352]).generate_state(1)[0])  # "SR": apart from the simulator's
    lr = degrade(hr, d.factor, d.psf_fwhm, d.noise_sigma, simulate.PRESETS[preset].pixel_scale, noise_seed)
    return hr, {**truth, "lr": lr}


def check_pairs(splits: dict, factor: int) -> None:
    """Every split holds LR beside HR, HR is factor times LR's size, and HR lies in PSNR's range [0, 1]."""
    for split, shards in splits.items():
        lr_shape = shards.manifest.get("image_columns", {}).get("lr")
        if lr_shape is None:
            raise DataError(f"{shards.path}: no lr image column; super-resolution data holds LR beside HR "
                            f"(an HR/ LR/ folder, or simulated pairs)")
        (_, big_h, big_w), (_, h, w) = shards.image_shape, lr_shape
        if (big_h, big_w) != (factor * h, factor * w):
            fits = big_h % h == 0 and big_h // h == big_w // w
            hint = f"set degrade.factor={big_h // h}" if fits else "no factor fits"
            raise DataError(f"{shards.path}: HR {big_h}x{big_w} is not degrade.factor={factor} times LR {h}x{w}; "
                            f"{hint}")
        lo, hi = shards.manifest.get("value_range", (0.0, 1.0))
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(f"{shards.path}: HR values span [{lo:.4g}, {hi:.4g}]; PSNR and SSIM here take images "
                            f"in [0, 1]: normalise the files")


def build_data(cfg) -> dict:
    """Train, val and test pairs (HR ``image``, LR ``lr``) from cfg.data and cfg.degrade alone.

    Simulated: the simulator's HR images, degraded by ``degrade``, cached by every setting
    that decides them. Real: ``data.path``, a folder of HR/ and LR/ pairs or platform shards.
    """
    d, g, root = cfg.data, cfg.degrade, config_lib.cache_dir(cfg)
    if d.source == "folder" or d.path:
        if not d.path:
            raise DataError("data.source=folder needs data.path=/path/to/pairs (HR/*.npy and LR/*.npy, "
                            "paired by name)")
        splits = data.from_pairs(os.path.expanduser(d.path), root, d.shard_size, d.val_fraction, d.test_fraction,
                                 d.seed)
        check_pairs(splits, g.factor)
        return splits
    if d.preset not in simulate.PRESETS:
        raise DataError(f"data.preset={d.preset} is not a simulator preset; expected one of "
                        f"{', '.join(simulate.PRESETS)}")
    size = simulate.PRESETS[d.preset].n_pix
    if size % g.factor:
        divisors = [str(k) for k in range(2, size + 1) if size % k == 0][:4]
        raise ConfigError(f"degrade.factor={g.factor} does not divide the {size}-pixel images of "
                          f"data.preset={d.preset}; use one of {', '.join(divisors)}, ...")
    sizes = data.split_sizes(d)
    splits = {}
    for split in data.SPLITS:
        seed = data.split_seed(d.seed, split)
        params = {"preset": d.preset, "seed": seed, "num_rows": sizes[split],
                  "simulator_version": simulate.SIMULATOR_VERSION, "factor": g.factor, "psf_fwhm": g.psf_fwhm,
                  "noise_sigma": g.noise_sigma, "degrade_version": DEGRADE_VERSION}
        splits[split] = data.cached_simulation(
            f"superres-{d.preset}", params, lambda n=sizes[split], s=seed: _simulate_pairs(d.preset, n, s, g),
            list(simulate.CLASS_NAMES), root, d.shard_size)
    check_pairs(splits, g.factor)
    return splits



def build_srresnet_data(cfg) -> dict:
    """``build_data``, after refusing a factor SRResNet's x2 upsampling stages cannot reach."""
    factor = cfg.degrade.factor
    if factor & (factor - 1):
        raise ConfigError(f"degrade.factor={factor} is not a power of 2; SRResNet upsamples in x2 PixelShuffle "
                          f"stages (use 2, 4 or 8)")
    return build_data(cfg)


def dihedral_pairs(hr: np.ndarray, lr: np.ndarray, strength: float, rng: np.random.Generator):
    """One random flip / right-angle rotation per pair, the same for its HR (B, C, H, W) and LR (B, C, h, w).

    Each pair is altered with probability ``strength``. The degradation commutes with these
    eight symmetries, so a transformed pair is exactly a pair the data could have held.
    """
    hr_out, lr_out = hr.copy(), lr.copy()
    for i in np.flatnonzero(rng.random(len(hr)) < strength):
        turns, flip = int(rng.integers(4)), rng.random() < 0.5
        for source, target in ((hr, hr_out), (lr, lr_out)):
            image = np.rot90(source[i], k=turns, axes=(1, 2))  # (C, H, W)
            target[i] = image[:, :, ::-1] if flip else image
    return hr_out, lr_out


def collate(batch: dict, cfg, training: bool) -> dict:
    hr = data.decode_images(batch)  # (B, C, H, W), read-only
    lr = data.decode_images(batch, "lr")  # (B, C, h, w), read-only
    if training and cfg.augment.strength > 0:
        # Drawn from NumPy's global generator, which the loop seeds per worker: reproducible runs.
        hr, lr = dihedral_pairs(hr, lr, cfg.augment.strength, np.random.default_rng(np.random.randint(2**31 - 1)))
    return {"lr": torch.from_numpy(np.array(lr)), "hr": torch.from_numpy(np.array(hr))}  # writable copies


# ---------------------------------------------------------------------------- steps


def train_step(model, batch: dict, cfg) -> dict:
    sr = model(batch["lr"]).float()  # (B, C, H, W)
    return {"loss": F.l1_loss(sr, batch["hr"])}


def superres_metrics(sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor, factor: int) -> dict[str, np.ndarray]:
    """Per-image psnr, ssim, mse of ``sr``, and bicubic_psnr, bicubic_ssim, bicubic_mse of bicubic-upsampled ``lr``.

    sr, hr (B, C, H, W), lr (B, C, h, w) tensors; returns (B,) arrays, an ``eval_step``'s output
    (``evaluate`` averages them over the split). Both estimates are compared with ``hr`` after
    clipping to [0, 1], the range of HR and of the metrics, as any image shown or stored would be.
    """
    with torch.no_grad():
        estimates = {"": sr, "bicubic_": bicubic(lr.float(), factor)}
        target = hr.detach().float().cpu().numpy()  # (B, C, H, W)
        out = {}
        for prefix, images in estimates.items():
            estimate = images.detach().float().clamp(0, 1).cpu().numpy()  # (B, C, H, W)
            out[prefix + "psnr"] = metrics.psnr(estimate, target)
            out[prefix + "ssim"] = metrics.ssim(estimate, target)
            out[prefix + "mse"] = metrics.mse(estimate, target)
    return out


def eval_step(model, batch: dict, cfg) -> dict:
    sr = model(batch["lr"]).float()  # (B, C, H, W)
    return superres_metrics(sr, batch["hr"], batch["lr"], cfg.degrade.factor)


def evaluate(outputs: dict, cfg) -> dict:
    names = [prefix + name for prefix in ("", "bicubic_") for name in METRICS]
    means = {name: float(np.mean(outputs[name])) for name in names}
    return {**means, "psnr_gain": means["psnr"] - means["bicubic_psnr"]}


# ---------------------------------------------------------------------------- plots


def superres_plots(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor, factor: int, panels: int = 6) -> dict:
    """{"panels.png": LR / bicubic / SR / HR rows, "power_spectrum.png": HR, SR and bicubic spectra} of a batch."""
    with torch.no_grad():
        images = {"LR": lr, "bicubic": bicubic(lr.float(), factor).clamp(0, 1), "SR": sr.clamp(0, 1), "HR": hr}
        images = {name: v.detach().float().cpu().numpy() for name, v in images.items()}  # (B, C, ., .)
    rows = {name: v[:panels, 0] for name, v in images.items()}  # (N, ., .) first channel
    spectrum = power_spectrum_figure({name: images[name] for name in ("HR", "SR", "bicubic")})
    # Beyond LR's Nyquist frequency bicubic has nothing to show; what SR puts there is its own.
    spectrum.axes[0].axvline(0.5 / factor, color="k", ls="--", lw=0.8, label="LR Nyquist")
    spectrum.axes[0].legend()
    panels_figure = image_rows_figure(rows, f"x{factor} super-resolution")
    for ax in panels_figure.axes:  # one colour scale for every panel, so brightness and noise compare across rows
        ax.images[0].set_clim(0.0, 1.0)
    return {"panels.png": panels_figure, "power_spectrum.png": spectrum}


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    with torch.no_grad():
        sr = model(batch["lr"]).float()  # (B, C, H, W)
    return superres_plots(batch["lr"], sr, batch["hr"], cfg.degrade.factor)


register(Task(
    name="superres",
    config=SuperResConfig,
    build_model=build_model,
    build_data=build_srresnet_data,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="psnr",
    mode="max",
    plots=plots,
    predict=lambda model, images, cfg: {"sr": model(images).float()},  # (B, 1, H, W) from LR images
    input_example=lambda batch: batch["lr"][:2].numpy(),
    references=tuple(
        Reference("psnr", value, definition, model, "simulated DeepLense Model I images (LR and HR sizes, scale not stated)",
                  "test split not stated", "P. Reddy, ML4SCI DeepLense GSoC 2023",
                  "https://github.com/ML4SCI/DeepLense/blob/main/Super_Resolution_Pranath_Reddy/README.md")
        for value, definition, model in ((30.50, "PSNR (dB); MSE 0.00089, SSIM 0.570", "RCAN"),
                                         (24.78, "PSNR (dB); MSE 0.00333, SSIM 0.303", "bilinear interpolation"))),
    defaults={"data.preset": "model_i", "data.num_train": 128, "data.num_val": 32, "train.batch_size": 16,
              "train.weight_decay": 0.0},
    description="super-resolution (simulated or real LR/HR pairs), SRResNet with L1 loss, PSNR/SSIM against bicubic",
))
