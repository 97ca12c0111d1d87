"""Lens finding (DeepLense Test II): galaxies in three bands, a few of them strong lenses.

    images, truth = simulate_lenses(n=2000, positive_fraction=1 / 17, seed=0, preset="hsc")  # (n, 3, 64, 64)

Every image is drawn in units of its band's sky noise (sigma = 1), then normalised as its preset
says. A lens (label 1) is a massive red elliptical (Sersic n=4) at the centre whose SIE mass plus
external shear bends a small blue star-forming galaxy (Sersic n=1) behind it into arcs or a ring at
theta_E. A non-lens has a galaxy of any kind near the centre and, as often as not, a blue companion
beside it, unlensed, where an arc could be: colour alone does not tell the classes apart, the
arcs' shape does. Neighbouring galaxies and stars fill the rest of the field. Each band has its
own PSF; the noise is the sky's plus the objects' own photon noise.

Presets:
- ``hsc`` (lens finding's default): the real HSC-SSP cutouts of the DeepLense lens-finding set,
  as measured on them (``platform/data/calibration.py`` holds the figures and checks them):
  0.168"/px, HSC's seeing per band, each band min-max normalised to [0, 1] as the files are, the
  sky at the real signal-to-noise (a normalised background of 0.07-0.21 with a noise of 0.02-0.07),
  bright centred lens galaxies, 1-3% of the field in neighbours. The lens population follows the
  SuGOHI HSC lens searches (Sonnenfeld et al. 2018, Wong et al. 2022: massive early-type
  deflectors, theta_E mostly 0.8-2", faint blue arcs); the non-lenses are survey galaxies of every
  type, as the real negatives are.
- ``ideal``: the simulator before calibration, a source domain for sim-to-real experiments:
  0.2"/px, one maximum over the three bands, little noise, no neighbours.

Deterministic from (preset, n, positive_fraction, seed), in fixed blocks like ``simulate``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from platform import lensing
from platform.data.simulate import SEED_BLOCK, _block_generator, render_batch

CLASS_NAMES = ("nonlenses", "lenses")  # label 1 is a lens
BANDS = ("g", "r", "i")
N_PIX = 64
VERSION = 4  # 3: photon noise in its Gaussian limit; 4: presets, sky units, neighbours, per-band normalisation
MAX_NEIGHBOURS = 6
LENS_COLOUR = (0.35, 0.7, 1.0)  # g, r, i flux of a red elliptical, brightest band 1
SOURCE_COLOUR = (1.0, 0.8, 0.55)  # of a blue star-forming galaxy

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class LensPreset:
    """One family of three-band cutouts. A (lo, hi) range is drawn uniformly (``log_*``: log-uniformly).
    Brightness is a peak signal-to-noise: the PSF-blurred component's brightest pixel over the sky's
    noise, in its brightest band."""

    pixel_scale: float  # arcsec / pixel
    psf_fwhm: tuple[Range, Range, Range]  # arcsec, per band (g, r, i)
    normalise: str  # "bands": each band min-max to [0, 1]; "peak": the three bands over one maximum
    gain: float  # sky-noise units of flux per photon-noise variance: larger is less object noise
    theta_e: Range  # arcsec
    lens_r_eff: Range  # arcsec, the lens galaxy's (and a non-lens's central galaxy's when it is an elliptical)
    log_lens_snr: Range  # log10 peak S/N of a lens galaxy
    log_arc_snr: Range  # log10 peak S/N of the lensed arcs
    # A non-lens's central galaxy: elliptical or disk (Sersic n 1-4), its own size and brightness,
    # within centre_offset (arcsec) of the centre.
    central_r_eff: Range
    log_central_snr: Range
    centre_offset: float
    companion_fraction: float  # non-lenses with an unlensed blue galaxy where an arc could be
    # Neighbours: 0..max_neighbours other galaxies (or stars, star_fraction of them) at least
    # neighbour_min_r (arcsec) from the centre.
    max_neighbours: int
    log_neighbour_snr: Range
    neighbour_min_r: float
    star_fraction: float

    @property
    def psf_size(self) -> int:
        """Odd kernel size covering +-4 sigma of the widest PSF."""
        sigma_px = max(hi for _, hi in self.psf_fwhm) / (2 * math.sqrt(2 * math.log(2))) / self.pixel_scale
        return 2 * max(1, math.ceil(4 * sigma_px)) + 1


PRESETS: dict[str, LensPreset] = {
    "hsc": LensPreset(
        pixel_scale=0.168,
        psf_fwhm=((0.65, 1.0), (0.6, 0.95), (0.5, 0.85)),  # HSC-SSP Wide seeing, g r i
        normalise="bands",
        gain=40.0,
        theta_e=(0.8, 2.2),
        lens_r_eff=(0.9, 2.2),
        log_lens_snr=(1.65, 2.25),
        log_arc_snr=(0.6, 1.4),
        central_r_eff=(0.2, 0.8),
        log_central_snr=(1.2, 1.8),
        centre_offset=0.8,
        companion_fraction=0.5,
        max_neighbours=4,
        log_neighbour_snr=(0.5, 1.8),
        neighbour_min_r=2.2,
        star_fraction=0.25,
    ),
    "ideal": LensPreset(
        pixel_scale=0.2,
        psf_fwhm=((0.8, 1.1), (0.7, 1.0), (0.6, 0.9)),
        normalise="peak",
        gain=400.0,
        theta_e=(0.5, 2.0),
        lens_r_eff=(0.6, 1.4),
        log_lens_snr=(1.5, 2.0),
        log_arc_snr=(0.8, 2.0),
        central_r_eff=(0.6, 1.4),
        log_central_snr=(1.5, 2.0),
        centre_offset=0.0,
        companion_fraction=1.0,
        max_neighbours=0,
        log_neighbour_snr=(1.0, 1.0),
        neighbour_min_r=2.0,
        star_fraction=0.0,
    ),
}
DEFAULT_PRESET = "hsc"


def get_preset(name: str) -> LensPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"data.preset={name} is not a lens-finding preset; expected one of {', '.join(PRESETS)}") from None


def _labels(n: int, positive_fraction: float, seed: int) -> np.ndarray:
    positives = int(round(n * positive_fraction))
    labels = np.zeros(n, dtype=np.int64)
    labels[:positives] = 1
    return np.random.default_rng(np.random.SeedSequence([seed, 0x6C656E73])).permutation(labels)  # "lens"


def _draw(p: LensPreset, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every parameter of b images, whatever their class, in a fixed order: the stream, and so each
    image, does not depend on the labels around it."""
    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (b,), generator=g, dtype=torch.float64)

    k = MAX_NEIGHBOURS
    d = {
        "theta_e": uniform(*p.theta_e),
        "lens_q": uniform(0.55, 0.95),
        "lens_phi": uniform(0.0, math.pi),
        "shear": uniform(0.0, 0.08),
        "shear_angle": uniform(0.0, math.pi),
        "lens_r_eff": uniform(*p.lens_r_eff),
        "lens_snr": 10 ** uniform(*p.log_lens_snr),
        "arc_snr": 10 ** uniform(*p.log_arc_snr),
        "source_r_eff": uniform(0.1, 0.35),
        "source_q": uniform(0.5, 1.0),
        "source_phi": uniform(0.0, math.pi),
        "source_radius": uniform(0.0, 1.0),  # in units of theta_E / 2 (lens) or of the companion's range
        "source_direction": uniform(0.0, 2 * math.pi),
        "central_n": uniform(1.0, 4.0),
        "central_r_eff": uniform(*p.central_r_eff),
        "central_snr": 10 ** uniform(*p.log_central_snr),
        "central_red": uniform(0.3, 1.0),  # survey galaxies are mostly red in g r i; 1: an elliptical's colours, 0: a star-forming galaxy's
        "central_radius": p.centre_offset * torch.sqrt(uniform(0.0, 1.0)),
        "central_direction": uniform(0.0, 2 * math.pi),
        "companion": uniform(0.0, 1.0),
        "n_neighbours": torch.randint(0, p.max_neighbours + 1, (b,), generator=g),
        "neighbour_radius": uniform(0.0, 1.0, b, k),
        "neighbour_direction": uniform(0.0, 2 * math.pi, b, k),
        "neighbour_snr": 10 ** uniform(*p.log_neighbour_snr, b, k),
        "neighbour_r_eff": uniform(0.15, 0.9, b, k),
        "neighbour_n": uniform(0.8, 4.0, b, k),
        "neighbour_q": uniform(0.4, 1.0, b, k),
        "neighbour_phi": uniform(0.0, math.pi, b, k),
        "neighbour_red": uniform(0.0, 1.0, b, k),
        "neighbour_star": uniform(0.0, 1.0, b, k),
    }
    for band in range(len(BANDS)):
        d[f"psf_fwhm_{band}"] = uniform(*p.psf_fwhm[band])
    return d


def _colour(red: torch.Tensor) -> torch.Tensor:
    """(..., 3) band fluxes, brightest band 1: ``red`` 1 an elliptical's, 0 a star-forming galaxy's."""
    lens, source = torch.tensor(LENS_COLOUR, dtype=red.dtype), torch.tensor(SOURCE_COLOUR, dtype=red.dtype)
    return red[..., None] * lens + (1 - red[..., None]) * source


def _blurred(profile: torch.Tensor, kernels: list[torch.Tensor], colour: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W): a (B, H, W) light profile in each band's colour (B, 3) and PSF, scaled so that its
    brightest pixel over the bands is ``snr`` (B,) sky sigmas."""
    bands = torch.stack([lensing.convolve_fft(profile, kernel) for kernel in kernels], dim=1)  # (B, 3, H, W)
    bands = bands * colour[:, :, None, None]
    peak = bands.amax(dim=(1, 2, 3)).clamp(min=1e-30)
    return bands * (snr / peak)[:, None, None, None]


def _render(p: LensPreset, d: dict[str, torch.Tensor], labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Noiseless (B, 3, H, W) images in sky-noise units."""
    lens = labels == 1
    ones = torch.ones_like(d["theta_e"])
    kernels = [lensing.gaussian_psf_kernel(d[f"psf_fwhm_{band}"], p.pixel_scale, p.psf_size, dtype=x.dtype)  # (B, k, k)
               for band in range(len(BANDS))]

    # The central galaxy: a lens's massive elliptical, or a non-lens's galaxy of any type, a little off-centre.
    cx = torch.where(lens, 0.0, d["central_radius"] * torch.cos(d["central_direction"]))
    cy = torch.where(lens, 0.0, d["central_radius"] * torch.sin(d["central_direction"]))
    n = torch.where(lens, 4.0, d["central_n"])
    r_eff = torch.where(lens, d["lens_r_eff"], d["central_r_eff"])
    central = lensing.sersic(x, y, ones, r_eff, n, d["lens_q"], d["lens_phi"], cx, cy)  # (B, H, W)
    colour = _colour(torch.where(lens, 1.0, d["central_red"]))
    image = _blurred(central, kernels, colour, torch.where(lens, d["lens_snr"], d["central_snr"]))

    # The blue galaxy: behind a lens, within theta_E / 2 of its axis, so strongly lensed into arcs;
    # beside a non-lens (companion_fraction of them), unlensed, 1-3.5" from its centre.
    radius = torch.where(lens, 0.5 * d["theta_e"] * d["source_radius"], 1.0 + 2.5 * d["source_radius"])
    sx, sy = radius * torch.cos(d["source_direction"]), radius * torch.sin(d["source_direction"])
    ax, ay = lensing.sie_deflection(x, y, d["theta_e"], d["lens_q"], d["lens_phi"])  # (B, H, W)
    g1, g2 = lensing.shear_components(d["shear"], d["shear_angle"])
    hx, hy = lensing.shear_deflection(x, y, g1, g2)
    on = lens.to(x.dtype)[:, None, None]  # no deflection at all for a non-lens
    bx, by = lensing.ray_trace(x, y, on * (ax + hx), on * (ay + hy))
    source = lensing.sersic(bx, by, ones, d["source_r_eff"], 1.0, d["source_q"], d["source_phi"], sx, sy)
    shown = lens | (d["companion"] < p.companion_fraction)
    blue = _colour(torch.zeros_like(ones))
    image = image + _blurred(source, kernels, blue, torch.where(shown, d["arc_snr"], 0.0))

    # Neighbours: galaxies and stars anywhere beyond neighbour_min_r, out to the field's corners.
    field = p.pixel_scale * x.shape[-1] / 2
    for k in range(MAX_NEIGHBOURS):
        r = p.neighbour_min_r + (field * math.sqrt(2) - p.neighbour_min_r) * d["neighbour_radius"][:, k]
        nx, ny = r * torch.cos(d["neighbour_direction"][:, k]), r * torch.sin(d["neighbour_direction"][:, k])
        star = d["neighbour_star"][:, k] < p.star_fraction
        size = torch.where(star, 0.02, d["neighbour_r_eff"][:, k])  # a star: a point, the PSF's shape once blurred
        light = lensing.sersic(x, y, ones, size, torch.where(star, 1.0, d["neighbour_n"][:, k]),
                               torch.where(star, 1.0, d["neighbour_q"][:, k]), d["neighbour_phi"][:, k], nx, ny)
        there = k < d["n_neighbours"]
        image = image + _blurred(light, kernels, _colour(d["neighbour_red"][:, k]),
                                 torch.where(there, d["neighbour_snr"][:, k], 0.0))
    return image


def _normalised(images: torch.Tensor, how: str) -> torch.Tensor:
    """(B, 3, H, W) as the preset's files are: each band to [0, 1], or all three over one maximum."""
    if how == "bands":
        lo = images.amin(dim=(-2, -1), keepdim=True)
        hi = images.amax(dim=(-2, -1), keepdim=True)
        return (images - lo) / (hi - lo).clamp(min=1e-12)
    images = images.clamp(min=0)
    return images / images.amax(dim=(-3, -2, -1), keepdim=True).clamp(min=1e-30)


def simulate_lenses(n: int, positive_fraction: float, seed: int,
                    preset: str = DEFAULT_PRESET) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n images (n, 3, 64, 64) float32 with about ``positive_fraction`` lenses, and truth columns.

    Truth: label (1 = lens), theta_e (arcsec; 0 for a non-lens), source_x, source_y (arcsec).
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    p = get_preset(preset)
    labels = _labels(n, positive_fraction, seed)
    images = np.empty((n, len(BANDS), N_PIX, N_PIX), dtype=np.float32)
    truth = {"label": labels, **{k: np.zeros(n, dtype=np.float32) for k in ("theta_e", "source_x", "source_y")}}
    x, y = lensing.pixel_grid(N_PIX, p.pixel_scale, dtype=torch.float32)  # (H, W)
    from platform.data.shards import progress

    with torch.inference_mode(), progress(n, f"simulating lens_finding {preset} (seed {seed})") as bar:
        for block, start in enumerate(range(0, n, SEED_BLOCK)):
            stop = min(start + SEED_BLOCK, n)
            g = _block_generator(seed, f"lens_finding-{preset}", block)
            d = {k: v.float() if v.is_floating_point() else v for k, v in _draw(p, stop - start, g).items()}
            lab = torch.from_numpy(labels[start:stop])
            step = render_batch(N_PIX, len(BANDS))
            for i in range(0, stop - start, step):
                j = min(i + step, stop - start)
                clean = _render(p, {k: v[i:j] for k, v in d.items()}, lab[i:j], x, y)  # (b, 3, H, W)
                # Sky noise 1 per band plus the objects' photon noise, in its Gaussian limit.
                sigma = torch.sqrt(1.0 + clean.clamp(min=0) / p.gain)
                noisy = clean + sigma * torch.randn(clean.shape, generator=g)
                images[start + i:start + j] = _normalised(noisy, p.normalise).numpy()
            lens = labels[start:stop] == 1
            radius = np.where(lens, 0.5 * d["theta_e"].numpy() * d["source_radius"].numpy(),
                              1.0 + 2.5 * d["source_radius"].numpy())
            truth["theta_e"][start:stop] = np.where(lens, d["theta_e"].numpy(), 0.0)
            truth["source_x"][start:stop] = radius * np.cos(d["source_direction"].numpy())
            truth["source_y"][start:stop] = radius * np.sin(d["source_direction"].numpy())
            bar.update(stop - start)
    return images, truth
