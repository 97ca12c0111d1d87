"""Denoising diffusion (DDPM) on lensing images, scored by FID against held-out images.

    python -m platform.tune task=diffusion
    python -m platform.train task=diffusion model.img_size=64 model.channels=64 train.epochs=200 \
        data.num_train=20000 fid.weights_path=/path/to/weights-inception-2015-12-05-6726825d.pth

DDPM (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"): an image x0 in [-1, 1] is
noised as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps over ``diffusion.timesteps`` steps of a
linear or cosine (Nichol & Dhariwal, 2021, "Improved DDPM") beta schedule, and a U-Net with
sinusoidal time embeddings learns to predict eps: the loss is the MSE at a uniformly drawn t.
An exponential moving average of the U-Net's weights (``model.ema``, updated after every
optimizer step) is what samples, with DDIM (Song et al., 2021) on ``diffusion.sample_steps``
respaced steps: ``diffusion.eta=1`` is DDPM-like ancestral sampling, ``eta=0`` deterministic.

Optimises ``fid``: the Frechet distance, computed with torch-fidelity, between the features
of EMA samples and of the held-out val images, one sample per val image from a noise seed
fixed by that image (so epochs compare like with like). Also logs ``loss``, the EMA weights'
denoising MSE on val at t and noise seeded the same way. ``fid.feature_extractor=auto`` uses torch-fidelity's Inception-v3
when its weights are on this machine (``fid.weights_path``, or torch's hub cache) and never
downloads; otherwise an offline random-weight CNN whose numbers are not comparable to
published FID. ``fid.extractor_module=my.module`` imports a module that registers another
extractor with ``torch_fidelity.register_feature_extractor`` (on the driver and every worker).
Plots: samples.png (EMA samples above val images) and slerp_walk.png (deterministic samples
along a spherical interpolation between two noise seeds).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.utils
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from platform import data
from platform.config import ConfigError, bounded, choice
from platform.data.augment import AugmentConfig, batch_images
from platform.plots import pyplot
from platform.registry import Task, register
from tasks._shared import resized

CHANNELS = 1  # the substructure images are single-band
INCEPTION = "inception-v3-compat"
PROXY = "lensing-random-cnn"
# torch-fidelity's file, and pytorch-fid's: the same converted TensorFlow weights (same layer
# names and hash prefix); torch hub caches either under its own name.
INCEPTION_FILES = (os.path.basename(URL_INCEPTION_V3), "pt_inception-2015-12-05-6726825d.pth")


@dataclass
class UNetConfig:
    img_size: int = bounded(32, 8)  # images are resized to this; 64 or 150 for real runs
    channels: int = bounded(32, 8)  # width of the first level
    channel_mults: list = field(default_factory=lambda: [1, 2, 2])  # width per level, each level halves the size
    num_res_blocks: int = bounded(1, 1)  # residual blocks per level (DDPM: 2)
    attention_res: int = bounded(8, 0)  # self-attention at this feature-map size; 0: none
    dropout: float = bounded(0.1, 0.0, 1.0, high_open=True)

    def __post_init__(self):
        if self.channels % 8:
            raise ConfigError(f"model.channels={self.channels} must be a multiple of 8 (group norm, sin/cos time embedding)")
        if not self.channel_mults or not all(isinstance(m, int) and m >= 1 for m in self.channel_mults):
            raise ConfigError(f"model.channel_mults={self.channel_mults} must be a list of positive integers, e.g. [1,2,2]")
        levels = len(self.channel_mults)
        if self.img_size % 2 ** (levels - 1):
            raise ConfigError(f"model.img_size={self.img_size} must be a multiple of {2 ** (levels - 1)} for "
                              f"{levels} levels (model.channel_mults)")
        sizes = [self.img_size // 2**k for k in range(levels)]
        if self.attention_res and self.attention_res not in sizes:
            raise ConfigError(f"model.attention_res={self.attention_res} is not a feature-map size of this U-Net; "
                              f"expected 0 (none) or one of {'|'.join(map(str, sizes))}")


@dataclass
class DiffusionConfig:
    timesteps: int = bounded(1000, 10)  # T
    schedule: str = choice("cosine", ["linear", "cosine"])
    sample_steps: int = bounded(25, 1)  # respaced steps when sampling for FID and plots
    eta: float = bounded(0.0, 0.0, 1.0)  # 1: DDPM-like ancestral sampling, 0: deterministic DDIM
    ema_decay: float = bounded(0.999, 0.0, 1.0, high_open=True)

    def __post_init__(self):
        if self.sample_steps > self.timesteps:
            raise ConfigError(f"diffusion.sample_steps={self.sample_steps} is more than diffusion.timesteps="
                              f"{self.timesteps}; expected at most {self.timesteps}")


@dataclass
class FidConfig:
    # auto: inception-v3-compat when its weights are on this machine, else the offline proxy
    # (lensing-random-cnn); resolved once, on the driver, and logged resolved.
    feature_extractor: str = "auto"
    weights_path: str = ""  # the Inception weights file (weights-inception-2015-12-05-6726825d.pth)
    extractor_module: str = ""  # a module that registers more extractors with torch-fidelity, e.g. tests.fid_extractor
    sample_fraction: float = bounded(1.0, 0.0, 1.0, low_open=True)  # of val images that get a generated counterpart


@dataclass
class DiffusionTaskConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=0.5))


# --------------------------------------------------------
# noise schedules and sampling
# --------------------------------------------------------
def alpha_bars(schedule: str, timesteps: int) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, float64."""
    if schedule == "linear":
        # Ho et al.'s 1e-4..0.02 for T=1000, scaled so another T spans the same noise (Nichol & Dhariwal)
        scale = 1000 / timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    else:
        # Nichol & Dhariwal's cosine: abar follows cos^2, so it falls slowly at both ends
        s = 0.008
        f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    # Below 1: a step that destroys everything leaves abar = 0, and x0 = x_t / sqrt(abar) undefined.
    return np.cumprod(1 - np.clip(betas, 0.0, 0.999))


def respaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from 0, last one first: 960, 920, ..., 0 for T=1000, 25 steps.

    DDIM's own spacing. It leaves out the last few timesteps, where abar is nearly 0: a
    first jump from there amplifies the noise prediction's error by 1 / sqrt(abar) into a
    saturated x0, which the next step then carries as if it were signal.
    """
    return [k * (timesteps // steps) for k in reversed(range(steps))]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, abar_prev: torch.Tensor, eta: float,
              clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from x_t to x_prev: (mean, sigma); the sample is mean + sigma * z.

    With eta = 1 and consecutive timesteps this is DDPM's posterior q(x_{t-1} | x_t, x0).
    """
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()  # (B, C, H, W) predicted clean image
    if clip:  # the data live in [-1, 1]; keep eps consistent with the clipped x0
        x0 = x0.clamp(-1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    return mean, sigma


def ddim_sample(eps_fn, alpha_bar: torch.Tensor, noise: torch.Tensor, steps: int, eta: float,
                generator: torch.Generator | None = None, clip: bool = True) -> torch.Tensor:
    """Images from ``noise`` (B, C, H, W): ``eps_fn(x_t, t)`` predicts the noise, ``alpha_bar`` (T,)."""
    x = noise.float()
    order = respaced_timesteps(len(alpha_bar), steps)
    for i, t in enumerate(order):
        abar = alpha_bar[t]
        abar_prev = alpha_bar[order[i + 1]] if i + 1 < len(order) else torch.ones_like(abar)
        eps = eps_fn(x, torch.full((len(x),), t, device=x.device, dtype=torch.long)).float()  # (B, C, H, W)
        x, sigma = ddim_step(x, eps, abar, abar_prev, eta, clip)
        if eta > 0 and i + 1 < len(order):
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
    return x


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape at weights t (K,) -> (K, *shape).

    Gaussian noise in many dimensions lies near a sphere of radius sqrt(D): slerp stays on
    it, where a straight line would pass inside and decode to washed-out images.
    """
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    omega = torch.arccos(cos)
    t = t.double()[:, None]  # (K, 1)
    if omega.abs() < 1e-6:  # (nearly) the same direction: the straight line is the arc
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)  # (K, D)
    return out.to(z0.dtype).reshape(len(t), *z0.shape)


# --------------------------------------------------------
# the U-Net (DDPM's, small)
# --------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of the timestep: (B,) -> (B, dim), frequencies 1 .. 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


def _norm(channels: int) -> nn.GroupNorm:
    # At least 4 channels per group (DDPM: 32 groups of 4): each group's spatial mean is
    # subtracted, and with one channel per group that mean is the image's brightness, which
    # the network could then no longer see (its samples came out too bright or too dark).
    return nn.GroupNorm(math.gcd(32, channels // 4), channels)


def _zero(module: nn.Module) -> nn.Module:
    # The last layer of each residual branch starts at zero: every block begins as the identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = h + self.time(F.silu(temb))[:, :, None, None]  # the timestep shifts every channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, Cout, H, W)
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2)  # (B, 3, HW, C)
        q, k, v = qkv[:, :, None].unbind(1)  # (B, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Block(nn.Module):
    """A residual block, with self-attention after it at the chosen resolution."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, temb, dropout)
        self.attn = Attention(cout) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    """(noisy image (B, C, H, W), timestep (B,)) -> predicted noise (B, C, H, W)."""

    def __init__(self, in_channels: int, channels: int, channel_mults: list, num_res_blocks: int,
                 attention_res: int, img_size: int, dropout: float):
        super().__init__()
        self.channels, temb = channels, 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down, skips, c, size = nn.ModuleList(), [channels], channels, img_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(Block(c, channels * mult, temb, dropout, size == attention_res))
                c = channels * mult
                skips.append(c)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # (B, c, H/2, W/2)
                skips.append(c)
                size //= 2

        self.mid1 = Block(c, c, temb, dropout, attention_res > 0)
        self.mid2 = Block(c, c, temb, dropout, False)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):  # one more: it takes the skip from before the level's blocks
                self.up.append(Block(c + skips.pop(), channels * mult, temb, dropout, size == attention_res))
                c = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                size *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), _zero(nn.Conv2d(c, in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.channels))  # (B, 4C)
        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid1(h, temb), temb)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(layer, Block) else layer(h)
        return self.out(h)  # (B, C_in, H, W)


class Diffusion(nn.Module):
    """The denoiser being trained (``net``), its moving average (``ema``) and the noise schedule.

    ``forward`` is the training loss; ``sample`` turns noise into images with the EMA weights.
    """

    def __init__(self, net: UNet, schedule: str, timesteps: int):
        super().__init__()
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)  # outside the optimizer and DDP's gradients
        self.register_buffer("alpha_bar", torch.tensor(alpha_bars(schedule, timesteps), dtype=torch.float32),
                             persistent=False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))  # in checkpoints: resumes keep it

    def forward(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                use_ema: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise-prediction MSE at timesteps t (B,) with noise (B, C, H, W), both drawn when not given.

        x0 (B, C, H, W) in [-1, 1]. Returns the mean loss () and each image's (B,).
        """
        if t is None:
            t = torch.randint(len(self.alpha_bar), (len(x0),), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        abar = self.alpha_bar[t][:, None, None, None]  # (B, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # (B, C, H, W)
        eps = (self.ema if use_ema else self.net)(x_t, t).float()  # (B, C, H, W)
        per_image = ((eps - noise) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return per_image.mean(), per_image

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int, eta: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """EMA samples (B, C, H, W) in [-1, 1] from Gaussian noise of that shape."""
        return ddim_sample(self.ema, self.alpha_bar, noise, steps, eta, generator).clamp(-1, 1)


def build_model(cfg) -> Diffusion:
    m = cfg.model
    net = UNet(CHANNELS, m.channels, list(m.channel_mults), m.num_res_blocks, m.attention_res, m.img_size, m.dropout)
    return Diffusion(net, cfg.diffusion.schedule, cfg.diffusion.timesteps)


@torch.no_grad()
def update_ema(model: Diffusion, decay: float) -> None:
    """ema <- ema + (1 - d) (net - ema), d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up (TensorFlow's ExponentialMovingAverage with num_updates) keeps a short run
    from sampling with weights that are still mostly the initial ones. All on the device:
    no host sync per step.
    """
    model.ema_updates += 1
    n = model.ema_updates.float()
    weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
    for ema, p in zip(model.ema.parameters(), model.net.parameters()):
        ema.lerp_(p, weight)
    for ema, b in zip(model.ema.buffers(), model.net.buffers()):
        ema.copy_(b)


def after_step(model: Diffusion, cfg) -> None:
    update_ema(model, cfg.diffusion.ema_decay)


# --------------------------------------------------------
# FID through torch-fidelity
# --------------------------------------------------------
class RandomLensCNN(FeatureExtractorBase):
    """Offline FID proxy: a small CNN with fixed random weights, 64 pooled features.

    Features of randomly initialised networks separate real from generated distributions
    well enough to rank models, without ImageNet's bias (Naeem et al., 2020, "Reliable
    Fidelity and Diversity Metrics for Generative Models", sec. 5; Lee et al., 2022,
    "Demystifying Randomly Initialized Networks for Evaluating Generative Models"). The
    numbers are on their own scale: never compare them with published (Inception) FID.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)  # the same weights on every machine and run
        widths = (1, 16, 32, 64, 64)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        for conv in self.convs:  # He-normal: activations keep their scale through the ReLUs
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / fan_in)
            nn.init.zeros_(conv.bias)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        # torch-fidelity hands every extractor uint8 (B, 3, H, W), Inception's input convention
        x = x.float().mean(dim=1, keepdim=True) / 127.5 - 1  # (B, 1, H, W) in [-1, 1]
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)  # any img_size
        for conv in self.convs:
            x = F.relu(conv(x))  # down to (B, 64, 4, 4)
        return (x.mean(dim=(2, 3)),)  # (B, 64)

    @staticmethod
    def get_provided_features_list():
        return ("64",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "64"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros((1, 3, 64, 64), dtype=torch.uint8)


if PROXY not in FEATURE_EXTRACTORS_REGISTRY:  # a module may be imported twice (as a plugin and by path)
    torch_fidelity.register_feature_extractor(PROXY, RandomLensCNN)


_EXTRACTORS: dict[tuple, tuple] = {}  # (name, weights, device) -> (network, its FID layer): built once per process


def fid_features(images: torch.Tensor, extractor: str, weights_path: str = "") -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) in [-1, 1], in ``extractor``'s FID layer, on the
    images' own device: each worker embeds its share of the val images where it ran them."""
    if len(images) == 0:  # no sample this batch: the feature width still comes from the network
        return fid_features(torch.zeros((1, *images.shape[1:]), device=images.device), extractor, weights_path)[:0]
    key = (extractor, weights_path, str(images.device))
    if key not in _EXTRACTORS:
        layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
        network = torch_fidelity.utils.create_feature_extractor(
            extractor, [layer], cuda=False, feature_extractor_weights_path=weights_path or None, verbose=False)
        _EXTRACTORS[key] = (network.to(images.device), layer)
    network, layer = _EXTRACTORS[key]
    # torch-fidelity's input convention: uint8 RGB (N, 3, H, W)
    pixels = torch.round((images.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        return network.convert_features_tuple_to_dict(network(pixels))[layer].float()  # (N, D)


def frechet_distance_of_features(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between two feature sets (N, D), torch-fidelity's formula."""
    if len(real) < 2 or len(generated) < 2:
        return float("nan")  # a covariance needs two images
    stats = [fid_features_to_statistics(torch.from_numpy(np.asarray(f, dtype=np.float64))) for f in (real, generated)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID])


def frechet_distance(real: np.ndarray, generated: np.ndarray, extractor: str, weights_path: str = "") -> float:
    """FID between two image sets (N, C, H, W) in [-1, 1], in the feature space of ``extractor``."""
    def features(images):
        return fid_features(torch.from_numpy(images), extractor, weights_path).numpy()
    if len(real) < 2 or len(generated) < 2:
        return float("nan")
    return frechet_distance_of_features(features(real), features(generated))


def _import_extractors(fid) -> None:
    if fid.extractor_module:
        try:
            importlib.import_module(fid.extractor_module)
        except ImportError as error:
            raise ConfigError(f"fid.extractor_module={fid.extractor_module} cannot be imported ({error})") from None


def cached_inception_weights() -> str:
    """Where torch-fidelity (or pytorch-fid) would have cached the Inception weights, if they are there."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return next((os.path.join(folder, f) for f in INCEPTION_FILES if os.path.isfile(os.path.join(folder, f))), "")


def resolve_feature_extractor(cfg) -> dict:
    """{"fid.feature_extractor": ..., "fid.weights_path": ...} as the run will use them, checked."""
    fid = cfg.fid
    _import_extractors(fid)
    extractor, weights_path = fid.feature_extractor, fid.weights_path
    if weights_path:
        weights_path = os.path.abspath(os.path.expanduser(weights_path))
        if not os.path.isfile(weights_path):
            raise ConfigError(f"fid.weights_path={weights_path} does not exist; expected the Inception weights "
                              f"file {INCEPTION_FILES[0]}")
    if extractor == "auto":
        weights_path = weights_path or cached_inception_weights()
        extractor = INCEPTION if weights_path else PROXY
        if not weights_path:
            print(f"warning: no Inception weights here, so val/fid uses the offline proxy {PROXY} and is not comparable "
                  f"to published FID; real FID needs fid.weights_path=/path/to/{INCEPTION_FILES[1]} (or "
                  f"torch-fidelity's {INCEPTION_FILES[0]})", file=sys.stderr, flush=True)
    elif extractor not in FEATURE_EXTRACTORS_REGISTRY:
        known = "|".join(["auto", *sorted(FEATURE_EXTRACTORS_REGISTRY)])
        raise ConfigError(f"fid.feature_extractor={extractor} is not a torch-fidelity feature extractor; "
                          f"expected one of {known} (or register one through fid.extractor_module)")
    return {"fid.feature_extractor": extractor, "fid.weights_path": weights_path}


# --------------------------------------------------------
# data, steps, metrics, plots
# --------------------------------------------------------
def build_data(cfg) -> tuple[dict, dict]:
    extractor = resolve_feature_extractor(cfg)  # before any data work: a bad setting is one line, at once
    return data.substructure(cfg), extractor


def collate(batch: dict, cfg, training: bool) -> dict:
    images = resized(batch_images(batch, cfg.augment, training), cfg.model.img_size)  # (B, 1, size, size) in [0, 1]
    return {"image": images * 2 - 1}  # (B, 1, size, size) in [-1, 1], the range the noise schedule assumes


def train_step(model, batch: dict, cfg) -> dict:
    x0 = batch["image"]  # (B, 1, H, W)
    # The loop seeds each worker's generator its own way: no two workers pair their images with the same noise.
    t = torch.randint(cfg.diffusion.timesteps, (len(x0),), device=x0.device)  # (B,)
    noise = torch.randn_like(x0)  # (B, 1, H, W)
    loss, _ = model(x0, t, noise)
    return {"loss": loss}


def image_seeds(images: torch.Tensor, salt: int) -> list[int]:
    """One seed per image, from a hash of its pixels: a val image draws the same noise every
    epoch, however the split is shared out over workers and batches."""
    key = (salt % 2**63).to_bytes(8, "little")
    pixels = images.detach().float().cpu().numpy()
    return [int.from_bytes(hashlib.blake2b(p.tobytes(), digest_size=8, key=key).digest(), "little") >> 1
            for p in pixels]


def _seeded_draws(seeds: list[int], shape: tuple, timesteps: int) -> tuple:
    """Per image: a uniform u (who gets a sample), t and noise for the loss, and the sample's starting noise."""
    u, t, loss_noise, start = [], [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        u.append(torch.rand((), generator=g))
        t.append(torch.randint(timesteps, (), generator=g))
        loss_noise.append(torch.randn(shape, generator=g))
        start.append(torch.randn(shape, generator=g))
    return torch.stack(u), torch.stack(t), torch.stack(loss_noise), torch.stack(start)


def eval_step(model, batch: dict, cfg) -> dict:
    x0 = batch["image"]  # (B, 1, H, W)
    seeds = image_seeds(x0, cfg.train.seed)
    u, t, loss_noise, start = _seeded_draws(seeds, tuple(x0.shape[1:]), cfg.diffusion.timesteps)
    _, loss = model(x0, t.to(x0.device), loss_noise.to(x0.device), use_ema=True)  # (B,)
    keep = u < cfg.fid.sample_fraction  # (B,) the same images every epoch
    if keep.any():
        # Ancestral noise (eta > 0) from the kept images' seeds: fixed too
        generator = torch.Generator(device=x0.device).manual_seed(sum(s for s, k in zip(seeds, keep) if k) % 2**63)
        generated = model.sample(start[keep].to(x0.device), cfg.diffusion.sample_steps, cfg.diffusion.eta, generator)
    else:
        generated = x0[:0]
    _import_extractors(cfg.fid)  # Ray workers: a plugged-in extractor registers itself here too
    extractor, weights = cfg.fid.feature_extractor, cfg.fid.weights_path
    return {"loss": loss, "real": x0, "generated": generated,  # generated: (B_kept, 1, H, W)
            "real_features": fid_features(x0, extractor, weights),  # (B, D)
            "generated_features": fid_features(generated, extractor, weights)}  # (B_kept, D)


def evaluate(outputs: dict, cfg) -> dict:
    fid = frechet_distance_of_features(outputs["real_features"], outputs["generated_features"])
    return {"fid": fid, "loss": float(outputs["loss"].mean())}


def image_grid(rows: dict[str, np.ndarray], title: str):
    """One row per entry (name -> (N, H, W) images in [-1, 1]), all on the one scale [-1, 1].

    Not per-image contrast: a sample too bright or without a ring must look it.
    """
    n = min(len(v) for v in rows.values())
    figure, axes = pyplot().subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            axes[r, c].imshow(images[c], cmap="magma", vmin=-1, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    d, figures = cfg.diffusion, {}
    generated, real = outputs["generated"][:16, 0], outputs["real"][:, 0]  # (N, H, W) each
    if len(generated):  # the best epoch's FID samples
        n = min(8, len(generated))
        rows = {"EMA samples": generated[:n], **({"more": generated[n:]} if len(generated) >= 2 * n else {}),
                "val images": real[:n]}
        figures["samples.png"] = image_grid(rows, f"{d.sample_steps} steps, eta {d.eta:g}, {d.schedule} schedule, "
                                                  f"T {d.timesteps}")

    shape = (CHANNELS, cfg.model.img_size, cfg.model.img_size)
    ends = [torch.randn(shape, generator=torch.Generator().manual_seed(cfg.train.seed + k)) for k in (1, 2)]
    weights = torch.linspace(0, 1, 8)
    noise = slerp(ends[0], ends[1], weights).to(batch["image"].device)  # (8, C, H, W)
    walk = model.sample(noise, d.sample_steps, eta=0.0)  # deterministic: the noise alone decides
    figures["slerp_walk.png"] = image_grid(
        {"slerp walk": walk[:, 0].float().cpu().numpy()},
        f"DDIM eta 0 from slerp(z0, z1, t), t = {', '.join(f'{w:.2f}' for w in weights.tolist())}")
    return figures


register(Task(
    name="diffusion",
    config=DiffusionTaskConfig,
    build_model=build_model,
    build_data=build_data,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="fid",
    mode="min",
    plots=plots,
    after_step=after_step,
    defaults={"train.lr": 1e-3, "train.weight_decay": 0.0, "train.batch_size": 32,
              "data.num_train": 256, "data.num_val": 64},
    description="denoising diffusion (DDPM, U-Net, EMA), FID of DDIM samples against held-out images",
))
