"""DeepLense-like strong-lensing images with dark-matter substructure, simulated in torch.

    images, truth = simulate("model_i", n=3000, seed=0)   # (n, 1, 150, 150) float32 in [0, 1]

Three classes, in this order: 0 "no" substructure, 1 "sphere" (CDM point-mass subhaloes),
2 "vort" (an axion vortex, a uniform rod of mass). Every image is an SIE lens plus external
shear, lensing an elliptical Sersic source, blurred by a Gaussian PSF, with photon and read
noise, then min-max normalised per image like the DeepLense files.

Presets: `model_i`, `model_ii`, `model_iii` follow DeepLense Models I-III (ML4SCI/DeepLense,
DeepLenseSim); `test1` spans the range of the DeepLense Common Test I images (ring radii of
15-33 px, strong shear and ellipticity, far off-centre sources, faint noise).

Determinism: images are drawn in fixed blocks of SEED_BLOCK; each block's random numbers come
from its own generator, seeded from (seed, preset, block index): the block's parameters are drawn
whole before any rendering, then each fixed batch (one class, in label order) is rendered and its
noise drawn, in order. So (preset, n, seed) fixes every image bit for bit (on one machine and
torch build); chunk_size does not enter. Blocks being independent, as many are drawn at once as
torch has threads, each on one core: faster than one block at a time with each op spread over
the cores (small ops scale badly across threads), and the same images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import zlib

import numpy as np
import torch

from platform import lensing

__all__ = ["CLASS_NAMES", "PRESETS", "Preset", "SIMULATOR_VERSION", "preview_grid", "simulate"]

CLASS_NAMES = ("no", "sphere", "vort")
# Bump when a preset or the rendering changes, so cached datasets are rebuilt.
SIMULATOR_VERSION = 5  # 2: true Poisson photon noise; 3: no NaN image at a vortex rod's end; 4: noise per render batch, Gaussian limit under read noise; 5: test1 calibrated to the real rings
SEED_BLOCK = 256
# Pixels rendered together, then given their noise and normalised: 8 images of 150x150 make a
# 0.7 MB float32 map, and each pass over it stays in a core's 2 MB L2 cache (a block of 256 images
# per core took 0.43 s in batches of 8, 0.49 s in batches of 32, 0.55 s with the noise drawn for
# the whole block); small images go more at a time, or each op's fixed cost dominates. Fixed,
# because results round differently at other batch sizes.
RENDER_PIXELS = 8 * 150 * 150


def render_batch(n_pix: int, bands: int = 1) -> int:
    """Images rendered together at n_pix x n_pix with ``bands`` channels."""
    return max(1, RENDER_PIXELS // (bands * n_pix * n_pix))

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One family of simulated images. A (lo, hi) range is drawn uniformly; lo == hi fixes it."""

    n_pix: int
    pixel_scale: float  # arcsec / pixel
    theta_e: Range  # SIE Einstein radius, arcsec
    lens_q: Range  # SIE axis ratio
    shear: Range  # external shear strength
    source_r_eff: Range  # Sersic effective radius, arcsec
    source_n: Range  # Sersic index
    source_q: Range  # Sersic axis ratio
    psf_fwhm: Range  # arcsec
    noise_sigma: Range  # read noise, relative to the noiseless peak
    # Counts at the noiseless peak, for photon noise; None: no photon noise.
    poisson_counts: Range | None = None
    # Source offset: each of x, y uniform in [-source_offset, source_offset] (arcsec), plus a
    # radius uniform in [0, source_offset_theta_e * theta_E] in a uniform direction.
    source_offset: float = 0.0
    source_offset_theta_e: float = 0.0
    # CDM "sphere" class: point subhaloes, dN/dm ~ m^slope on subhalo_mass (Msun), uniform
    # in area between the radii subhalo_radius (arcsec) around the lens centre.
    n_subhalos: tuple[int, int] = (25, 25)
    subhalo_mass: Range = (1e6, 1e10)
    subhalo_slope: float = -0.9
    subhalo_radius: Range = (0.25, 2.0)
    # Axion "vort" class: a rod of vortex_mass (Msun) with half-length
    # 0.03" (1e-22 eV / m_a), m_a log-uniform on axion_mass (eV), clipped to
    # vortex_max_half_length; its centre within vortex_offset (arcsec) of the lens centre.
    vortex_mass: float = 3e10
    axion_mass: Range = (1e-24, 1e-22)
    vortex_max_half_length: float = 1.5
    vortex_offset: float = 0.0
    z_lens: float = 0.5
    z_source: float = 1.0

    @property
    def psf_size(self) -> int:
        """Odd kernel size covering +-4 sigma of the widest PSF."""
        sigma_px = self.psf_fwhm[1] / (2 * math.sqrt(2 * math.log(2))) / self.pixel_scale
        return 2 * max(1, math.ceil(4 * sigma_px)) + 1


PRESETS: dict[str, Preset] = {
    # DeepLense Model I (lenstronomy, DeepLenseSim): SIE + shear 0.05, Sersic n=1 R=0.25"
    # offset within 0.35", Gaussian PSF 0.087", SNR ~25, vortex along the lens centre.
    "model_i": Preset(
        n_pix=150,
        pixel_scale=0.05,
        theta_e=(1.2, 1.3),
        lens_q=(0.75, 0.9),
        shear=(0.04, 0.06),
        source_r_eff=(0.25, 0.25),
        source_n=(1.0, 1.0),
        source_q=(0.75, 0.9),
        psf_fwhm=(0.087, 0.087),
        noise_sigma=(0.03, 0.05),
        poisson_counts=(200.0, 600.0),
        source_offset=0.35,
        vortex_max_half_length=1.5,
    ),
    # Model II: Euclid VIS-like, 64x64 at 0.101"/px, PSF ~0.16", noisier.
    "model_ii": Preset(
        n_pix=64,
        pixel_scale=0.101,
        theta_e=(1.2, 1.3),
        lens_q=(0.75, 0.9),
        shear=(0.04, 0.06),
        source_r_eff=(0.25, 0.25),
        source_n=(1.0, 1.0),
        source_q=(0.75, 0.9),
        psf_fwhm=(0.16, 0.16),
        noise_sigma=(0.04, 0.08),
        poisson_counts=(100.0, 300.0),
        source_offset=0.35,
        vortex_max_half_length=1.3,
    ),
    # Model III: HST-like, 64x64 at 0.08"/px, PSF ~0.08".
    "model_iii": Preset(
        n_pix=64,
        pixel_scale=0.08,
        theta_e=(1.2, 1.3),
        lens_q=(0.75, 0.9),
        shear=(0.04, 0.06),
        source_r_eff=(0.25, 0.25),
        source_n=(1.0, 1.0),
        source_q=(0.75, 0.9),
        psf_fwhm=(0.08, 0.08),
        noise_sigma=(0.02, 0.04),
        poisson_counts=(300.0, 1000.0),
        source_offset=0.35,
        vortex_max_half_length=1.0,
    ),
    # Common Test I range, checked against the real files' figures (platform/data/calibration.py):
    # rings whose bright pixels lie a median 23 px (15-33) from the centre at 0.05"/px, quads from
    # strong shear and ellipticity, sources off-centre by up to 0.6 theta_E (which puts the brighter
    # image outside theta_E: the rings measured on the images are wider than theta_E itself), noise
    # ~0.003 of the peak (after min-max normalisation the background sits near 0.01, as in the files).
    "test1": Preset(
        n_pix=150,
        pixel_scale=0.05,
        theta_e=(0.55, 1.35),
        lens_q=(0.5, 1.0),
        shear=(0.0, 0.2),
        source_r_eff=(0.08, 0.4),
        source_n=(0.5, 2.0),
        source_q=(0.5, 1.0),
        psf_fwhm=(0.06, 0.15),
        noise_sigma=(0.002, 0.004),
        poisson_counts=None,
        source_offset_theta_e=0.6,
        n_subhalos=(15, 35),
        vortex_max_half_length=1.5,
        vortex_offset=0.2,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown simulator preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def _block_generator(seed: int, preset: str, block: int) -> torch.Generator:
    # SeedSequence mixes the entropy well; the preset's CRC keeps presets' streams apart.
    state = np.random.SeedSequence([seed, zlib.crc32(preset.encode()), block]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _labels(n: int, seed: int) -> np.ndarray:
    """Balanced classes (counts differ by at most one) in a seeded random order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6C61626C]))  # "labl"
    return rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int64)


def _draw(p: Preset, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """All random parameters of a block of b images, in float64, in a fixed order.

    Every image draws every parameter (subhaloes and vortex included) whatever its class,
    so that the stream, and hence every image, does not depend on the labels around it.
    """

    def uniform(r: Range, *shape: int) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * torch.rand(shape or (b,), generator=g, dtype=torch.float64)

    d: dict[str, torch.Tensor] = {}
    d["theta_e"] = uniform(p.theta_e)
    d["lens_q"] = uniform(p.lens_q)
    d["lens_phi"] = uniform((0.0, math.pi))
    d["shear"] = uniform(p.shear)
    d["shear_angle"] = uniform((0.0, math.pi))
    square = uniform((-p.source_offset, p.source_offset), b, 2)
    radius = p.source_offset_theta_e * d["theta_e"] * uniform((0.0, 1.0))
    direction = uniform((0.0, 2 * math.pi))
    d["source_x"] = square[:, 0] + radius * torch.cos(direction)
    d["source_y"] = square[:, 1] + radius * torch.sin(direction)
    d["source_r_eff"] = uniform(p.source_r_eff)
    d["source_n"] = uniform(p.source_n)
    d["source_q"] = uniform(p.source_q)
    d["source_phi"] = uniform((0.0, math.pi))
    d["psf_fwhm"] = uniform(p.psf_fwhm)
    d["noise_sigma"] = uniform(p.noise_sigma)
    d["poisson_counts"] = uniform(p.poisson_counts) if p.poisson_counts else torch.zeros(b, dtype=torch.float64)

    # Subhaloes: (b, K_max), the unused tail of each row massless.
    k_lo, k_hi = p.n_subhalos
    n_sub = torch.randint(k_lo, k_hi + 1, (b,), generator=g)
    a = p.subhalo_slope + 1  # inverse CDF of dN/dm ~ m^slope (log-uniform at slope -1)
    m_lo, m_hi = p.subhalo_mass
    u = uniform((0.0, 1.0), b, k_hi)
    if a == 0:
        mass = m_lo * (m_hi / m_lo) ** u
    else:
        mass = (m_lo**a + (m_hi**a - m_lo**a) * u) ** (1 / a)
    mass = torch.where(torch.arange(k_hi) < n_sub[:, None], mass, 0.0)
    r_lo, r_hi = p.subhalo_radius
    r = torch.sqrt(uniform((r_lo**2, r_hi**2), b, k_hi))
    t = uniform((0.0, 2 * math.pi), b, k_hi)
    d["sub_theta_e"] = torch.sqrt(lensing.mass_to_theta_e_sq(mass, p.z_lens, p.z_source))
    d["sub_x"], d["sub_y"] = r * torch.cos(t), r * torch.sin(t)
    d["n_subhalos"] = n_sub

    # Vortex.
    log_lo, log_hi = math.log10(p.axion_mass[0]), math.log10(p.axion_mass[1])
    d["axion_mass"] = 10 ** uniform((log_lo, log_hi))
    d["vortex_half_length"] = (0.03 * 1e-22 / d["axion_mass"]).clamp(max=p.vortex_max_half_length)
    d["vortex_angle"] = uniform((0.0, math.pi))
    r = p.vortex_offset * torch.sqrt(uniform((0.0, 1.0)))
    t = uniform((0.0, 2 * math.pi))
    d["vortex_x"], d["vortex_y"] = r * torch.cos(t), r * torch.sin(t)
    return d


def _render(p: Preset, d: dict[str, torch.Tensor], labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Noiseless images (B, H, W), peak 1, for parameters d (float32) and labels (B,).

    x is passed as a (1, W) row and y as an (H, 1) column: the grid is separable, so
    offsets from each deflector are vectors and only the products fill (B, H, W).
    """
    x, y = x[:1, :], y[:, :1]  # (1, W), (H, 1)
    ax, ay = lensing.sie_deflection(x, y, d["theta_e"], d["lens_q"], d["lens_phi"])  # (B, H, W)
    g1, g2 = lensing.shear_components(d["shear"], d["shear_angle"])
    sx, sy = lensing.shear_deflection(x, y, g1, g2)
    ax, ay = ax + sx, ay + sy

    # Substructure only for the images of its class.
    sphere = torch.nonzero(labels == 1).flatten()
    if len(sphere):
        px, py = lensing.point_mass_deflection(x, y, d["sub_theta_e"][sphere], d["sub_x"][sphere], d["sub_y"][sphere])
        ax.index_add_(0, sphere, px)
        ay.index_add_(0, sphere, py)
    vort = torch.nonzero(labels == 2).flatten()
    if len(vort):
        te_sq = lensing.mass_to_theta_e_sq(p.vortex_mass, p.z_lens, p.z_source)
        vx, vy = lensing.vortex_deflection(
            x, y, torch.full((len(vort),), te_sq, dtype=x.dtype, device=x.device), d["vortex_x"][vort], d["vortex_y"][vort],
            d["vortex_half_length"][vort], d["vortex_angle"][vort],
        )
        ax.index_add_(0, vort, vx)
        ay.index_add_(0, vort, vy)

    bx, by = lensing.ray_trace(x, y, ax, ay)
    img = lensing.sersic(bx, by, 1.0, d["source_r_eff"], d["source_n"], d["source_q"], d["source_phi"],
                         d["source_x"], d["source_y"])  # (B, H, W)
    fixed_psf = p.psf_fwhm[0] == p.psf_fwhm[1]  # one kernel for all: one FFT of it
    fwhm = p.psf_fwhm[0] if fixed_psf else d["psf_fwhm"]
    kernel = lensing.gaussian_psf_kernel(fwhm, p.pixel_scale, p.psf_size, device=img.device, dtype=img.dtype)  # (k, k) or (B, k, k)
    img = lensing.convolve_fft(img, kernel)
    return img / img.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-30)


def _minmax(images: torch.Tensor) -> torch.Tensor:
    lo = images.amin(dim=(-2, -1), keepdim=True)
    hi = images.amax(dim=(-2, -1), keepdim=True)
    return (images - lo) / (hi - lo).clamp(min=1e-12)


TRUTH_FLOAT = ("theta_e", "source_x", "source_y", "lens_q", "lens_phi", "ellipticity", "shear", "shear_angle",
               "vortex_mass", "axion_mass", "vortex_half_length", "source_r_eff", "source_n", "psf_fwhm",
               "noise_sigma")


def simulate(preset: str, n: int, seed: int, chunk_size: int = 256,
             device: str = "cpu") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n images of a preset: (n, 1, H, W) float32 in [0, 1], and truth columns of length n.

    Truth: label (int64), n_subhalos (int64), and float32 theta_e, source_x, source_y (arcsec),
    lens_q, lens_phi (rad), ellipticity ((1 - q) / (1 + q)), shear, shear_angle (rad),
    vortex_mass (Msun), axion_mass (eV) (both 0 without a vortex), vortex_half_length
    (arcsec, 0 without), source_r_eff (arcsec), source_n, psf_fwhm (arcsec), noise_sigma
    (read noise over the noiseless peak).

    chunk_size is accepted for interface compatibility and changes nothing: images are
    rendered in fixed batches (render_batch) inside fixed seed blocks of SEED_BLOCK, since
    float rounding in the batched kernels (FFT, vectorised tails) depends on batch size,
    and memory stays at one block (~25 MB at 150x150) either way.

    ``device="cuda"``: rendered on a GPU, one block at a time, its noise drawn there by a CUDA
    generator seeded from the block's: the same parameters and truth, other (equally distributed)
    noise than the CPU's for the same seed.
    """
    p = get_preset(preset)
    if n < 0 or chunk_size < 1:
        raise ValueError(f"need n >= 0 and chunk_size >= 1, got n={n}, chunk_size={chunk_size}")
    labels = _labels(n, seed)
    images = np.empty((n, 1, p.n_pix, p.n_pix), dtype=np.float32)
    truth = {k: np.zeros(n, dtype=np.float32) for k in TRUTH_FLOAT}
    truth["label"] = labels
    truth["n_subhalos"] = np.zeros(n, dtype=np.int64)
    x, y = lensing.pixel_grid(p.n_pix, p.pixel_scale, device=device, dtype=torch.float32)  # (H, W)

    from platform.data.shards import progress

    def draw_block(block: int):  # one seed block: its own generator, so blocks may run in any order
        start, stop = block * SEED_BLOCK, min((block + 1) * SEED_BLOCK, n)
        with torch.inference_mode():
            images[start:stop, 0], d = _block(p, _block_generator(seed, preset, block), labels[start:stop], x, y)
        _fill_truth(truth, slice(start, stop), p, d, labels[start:stop])
        return stop - start

    blocks = range(math.ceil(n / SEED_BLOCK))
    threads = torch.get_num_threads()
    at_once = max(1, min(threads, len(blocks))) if torch.device(device).type == "cpu" else 1
    # Blocks side by side, each on its own core: faster than each op spread over the cores.
    torch.set_num_threads(max(1, threads // at_once))
    try:
        with progress(n, f"simulating {preset} (seed {seed})") as bar, \
                concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            for drawn in pool.map(draw_block, blocks):
                bar.update(drawn)
    finally:
        torch.set_num_threads(threads)
    return images, truth


def _block(p: Preset, g: torch.Generator, labels: np.ndarray, x: torch.Tensor, y: torch.Tensor):
    """(noisy min-max normalised images (b, H, W) as numpy, the drawn parameters) of one seed block."""
    d = _draw(p, len(labels), g)
    device = x.device
    if device.type != "cpu":  # noise drawn where the images are (a CPU generator would sync each draw)
        g = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    lab = torch.from_numpy(labels).to(device)
    d32 = {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in d.items()}
    images = torch.empty(len(labels), p.n_pix, p.n_pix, device=device)  # (b, H, W)
    # Batches of one class: a class's substructure (25 subhaloes, or a rod) is then a few ops over
    # the whole batch, not the same ops over its two or three images of that class.
    by_class = torch.from_numpy(np.argsort(labels, kind="stable")).to(device)
    step = render_batch(p.n_pix)
    for i in range(0, len(labels), step):  # render, noise and normalise while the batch is in cache
        rows = by_class[i:i + step]
        batch = {k: v[rows] for k, v in d32.items()}
        clean = _render(p, batch, lab[rows], x, y)  # (step, H, W)
        counts = batch["poisson_counts"] if p.poisson_counts else None
        images[rows] = _minmax(lensing.add_noise(clean, g, poisson_scale=counts, gaussian_sigma=batch["noise_sigma"]))
    return images.cpu().numpy(), d


def _fill_truth(truth: dict[str, np.ndarray], rows: slice, p: Preset, d: dict[str, torch.Tensor], labels: np.ndarray):
    sphere, vort = labels == 1, labels == 2
    for k in ("theta_e", "source_x", "source_y", "lens_q", "lens_phi", "shear", "shear_angle", "source_r_eff",
              "source_n", "psf_fwhm", "noise_sigma"):
        truth[k][rows] = d[k].numpy()
    q = d["lens_q"].numpy()
    truth["ellipticity"][rows] = (1 - q) / (1 + q)
    truth["n_subhalos"][rows] = np.where(sphere, d["n_subhalos"].numpy(), 0)
    truth["vortex_mass"][rows] = np.where(vort, p.vortex_mass, 0.0)
    truth["axion_mass"][rows] = np.where(vort, d["axion_mass"].numpy(), 0.0)
    truth["vortex_half_length"][rows] = np.where(vort, d["vortex_half_length"].numpy(), 0.0)


def preview_grid(images, labels, path: str, class_names=CLASS_NAMES, n_per_class: int = 4) -> str:
    """A PNG with one row per class, the first n_per_class images of each; returns path."""
    # The object API with an Agg canvas leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images, labels = np.asarray(images), np.asarray(labels)
    n_cls = len(class_names)
    fig = Figure(figsize=(2 * n_per_class, 2 * n_cls))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_cls, n_per_class, squeeze=False)
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)[:n_per_class]
        for j in range(n_per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                img = images[idx[j]]
                img = img.reshape(img.shape[-2:]) if img.ndim == 3 and img.shape[0] == 1 else img
                if img.ndim == 3 and img.shape[0] == 3:  # bands bluest first (g, r, i): shown as RGB = (i, r, g)
                    rgb = np.moveaxis(img[::-1], 0, -1)  # (H, W, 3)
                    ax.imshow((rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-12), origin="lower")
                else:
                    ax.imshow(img if img.ndim == 2 else img[0], origin="lower", cmap="inferno")
            if j == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
