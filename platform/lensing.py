"""Differentiable strong-lensing physics in torch: deflections, ray tracing, sources, PSF, noise.

Everything is batched over a leading batch dimension B and works in float32 and float64
under autograd. Angles are in arcseconds. Coordinates come from ``pixel_grid`` as a shared
(H, W) grid, or as a per-image (B, H, W) grid; since that grid is separable, x as a (1, W)
row and y as an (H, 1) column work too and save passes over the image. A parameter is a
Python float (the same for every image), a (B,) tensor (one per image) or, for the
functions that sum several deflectors, a (B, K) tensor (K per image).

Conventions follow lenstronomy: the lens equation is beta = theta - alpha(theta), x grows
with the column index and y with the row index, a position angle is measured from the x
axis towards y, and an axis ratio q <= 1 puts the major axis along that angle.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "pixel_grid",
    "sis_deflection",
    "sie_deflection",
    "shear_deflection",
    "shear_components",
    "point_mass_deflection",
    "nfw_deflection",
    "vortex_deflection",
    "mass_to_theta_e_sq",
    "sigma_crit_msun_per_arcsec2",
    "sersic",
    "sersic_b",
    "ray_trace",
    "gaussian_psf_kernel",
    "convolve_fft",
    "add_noise",
    "sample_source_plane",
    "splat_to_source_plane",
    "inverse_magnification",
]

# Softening length (arcsec) for the centres of singular profiles: far below a pixel, yet
# its square is a normal float32, so values and gradients stay finite at r = 0.
EPS = 1e-6

Tensorish = float | torch.Tensor


# ---------------------------------------------------------------------------- helpers


def _per_image(p: Tensorish, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) parameter shaped to broadcast against (H, W) or (B, H, W) maps."""
    if not torch.is_tensor(p):
        return torch.as_tensor(p, dtype=like.dtype, device=like.device)
    if p.ndim == 0:
        return p
    if p.ndim != 1:
        raise ValueError(f"expected a scalar or a (B,) parameter, got shape {tuple(p.shape)}")
    return p.reshape(-1, 1, 1)  # (B, 1, 1)


def _per_deflector(p: Tensorish, like: torch.Tensor) -> torch.Tensor:
    """A scalar, (B,) or (B, K) parameter as (B, K) (or (1, 1) for a scalar)."""
    if not torch.is_tensor(p):
        p = torch.as_tensor(p, dtype=like.dtype, device=like.device)
    if p.ndim == 0:
        return p.reshape(1, 1)
    if p.ndim == 1:
        return p[:, None]
    if p.ndim != 2:
        raise ValueError(f"expected a scalar, (B,) or (B, K) parameter, got shape {tuple(p.shape)}")
    return p


def _deflectors(like: torch.Tensor, *params: Tensorish) -> tuple[int, list[torch.Tensor]]:
    """K and the parameters of K deflectors per image, each broadcast to (B, K)."""
    ps = [_per_deflector(p, like) for p in params]
    shape = torch.broadcast_shapes(*(p.shape for p in ps))
    return shape[1], [p.expand(shape) for p in ps]


def _k(p: torch.Tensor, k: int) -> torch.Tensor:
    return p[:, k].reshape(-1, 1, 1)  # (B, 1, 1)


def _rotate(dx: torch.Tensor, dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Coordinates in a frame whose first axis points along the angle (cos, sin)."""
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _unrotate(ap: torch.Tensor, ad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Vector components from that rotated frame back to the image frame."""
    return cos * ap - sin * ad, sin * ap + cos * ad


def _where_safe(small: torch.Tensor, series, exact, e: torch.Tensor, exact_at: float, series_at: float = 0.0):
    """series(e) where `small`, exact(e) elsewhere, with gradients finite on both sides.

    The exact form is singular at the point the series covers, and torch.where still
    back-propagates (zeros) through the branch it did not pick, where 0 * inf = NaN. So
    each branch only ever sees its own region, the rest being a harmless placeholder
    (the "double where" trick). Whole-tensor decisions skip the branch nobody needs.
    """
    if not bool(small.any()):
        return exact(e)
    if bool(small.all()):
        return series(e)
    e_exact = torch.where(small, torch.full_like(e, exact_at), e)
    e_series = torch.where(small, e, torch.full_like(e, series_at))
    return torch.where(small, series(e_series), exact(e_exact))


# ---------------------------------------------------------------------------- grid


def pixel_grid(n_pix: int, pixel_scale: float, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (arcsec) of an n_pix x n_pix image centred on the origin."""
    c = (torch.arange(n_pix, device=device, dtype=dtype or torch.get_default_dtype()) - (n_pix - 1) / 2) * pixel_scale
    y, x = torch.meshgrid(c, c, indexing="ij")  # (H, W) each: rows are y, columns are x
    return x.contiguous(), y.contiguous()  # meshgrid's are stride-0 views


# ---------------------------------------------------------------------------- main lens


def sis_deflection(x, y, theta_e, x0=0.0, y0=0.0):
    """Singular isothermal sphere: alpha = theta_E r_hat."""
    te, x0, y0 = (_per_image(p, x) for p in (theta_e, x0, y0))
    dx, dy = x - x0, y - y0  # (B, H, W)
    r = torch.sqrt(dx * dx + dy * dy + EPS**2)
    return te * dx / r, te * dy / r


def _atan_ratio(u: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    # arctan(sqrt(e2) u) / sqrt(e2), which tends to u as e2 = 1 - q^2 -> 0 (the SIS).
    def series(e):
        u2 = u * u
        return u * (1 - e * u2 * (1 / 3 - e * u2 * (1 / 5 - e * u2 / 7)))

    def exact(e):
        s = torch.sqrt(e)
        return torch.atan(s * u) / s

    return _where_safe(e2 < 1e-3, series, exact, e2, 0.5)


def _atanh_ratio(v: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    # arctanh(sqrt(e2) v) / sqrt(e2); |v| <= 1 and e2 < 1 keep the argument inside (-1, 1).
    def series(e):
        v2 = v * v
        return v * (1 + e * v2 * (1 / 3 + e * v2 * (1 / 5 + e * v2 / 7)))

    def exact(e):
        s = torch.sqrt(e)
        return torch.atanh(s * v) / s

    return _where_safe(e2 < 1e-3, series, exact, e2, 0.5)


def sie_deflection(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """Singular isothermal ellipsoid in lenstronomy's convention ("SIE", i.e. NIE with s -> 0).

    theta_e is the Einstein radius of the circularised profile (lenstronomy's theta_E),
    q in (0, 1] the axis ratio of the convergence, phi the position angle of the major axis
    (radians). q = 1 is exactly the SIS. Lenstronomy's e1, e2 relate to these through
    e = (1 - q) / (1 + q), e1 = e cos 2 phi, e2 = e sin 2 phi.
    """
    te, q, phi, x0, y0 = (_per_image(p, x) for p in (theta_e, q, phi, x0, y0))
    cos, sin = torch.cos(phi), torch.sin(phi)
    xr, yr = _rotate(x - x0, y - y0, cos, sin)  # (B, H, W) along / across the major axis
    psi = torch.sqrt(q * q * xr * xr + yr * yr + EPS**2)
    # Working with e2 = 1 - q^2 rather than sqrt(1 - q^2) keeps d/dq finite at q = 1.
    e2 = (1 - q * q).clamp(min=0)
    b = te * torch.sqrt(q)  # lenstronomy: theta_E -> major-axis b = theta_E sqrt(q) at s = 0
    ax_r = b * _atan_ratio(xr / psi, e2)
    ay_r = b * _atanh_ratio(yr / psi, e2)
    return _unrotate(ax_r, ay_r, cos, sin)


def shear_components(gamma, angle):
    """(g1, g2) = gamma (cos 2 angle, sin 2 angle): external shear of strength gamma along angle."""
    if torch.is_tensor(angle):
        return gamma * torch.cos(2 * angle), gamma * torch.sin(2 * angle)
    return gamma * np.cos(2 * angle), gamma * np.sin(2 * angle)


def shear_deflection(x, y, g1, g2):
    """External shear about the origin: alpha = (g1 x + g2 y, g2 x - g1 y)."""
    g1, g2 = _per_image(g1, x), _per_image(g2, x)
    return g1 * x + g2 * y, g2 * x - g1 * y  # (B, H, W) each


# ---------------------------------------------------------------------------- substructure


def point_mass_deflection(x, y, theta_e, x0, y0):
    """Sum of K point masses per image: alpha = theta_E^2 (theta - theta_k) / |theta - theta_k|^2.

    theta_e, x0, y0 are (B, K) (or (B,) for one). The loop over K accumulates (B, H, W)
    maps, so memory never holds a (B, K, H, W) temporary.
    """
    n_k, (te, x0, y0) = _deflectors(x, theta_e, x0, y0)
    te2 = te * te
    if not _tracks_grad(x, y, te2, x0, y0):
        return _point_mass_fast(x, y, te2, x0, y0)
    ax = ay = 0.0
    for k in range(n_k):
        dx, dy = x - _k(x0, k), y - _k(y0, k)  # (B, H, W)
        f = _k(te2, k) / (dx * dx + dy * dy + EPS**2)
        ax, ay = ax + f * dx, ay + f * dy
    return _as_maps(ax, x), _as_maps(ay, x)


def _tracks_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in ts)


def _point_mass_fast(x, y, te2, x0, y0):
    """The same sum without autograd: accumulated in place, a few images at a time.

    Each subhalo costs four passes over (B, H, W), on buffers small enough to stay in
    cache; with a separable grid (x as (1, W), y as (H, 1)) the offsets themselves are
    only vectors. This is what makes the simulator's 25-subhalo images cheap.
    """
    shape = torch.broadcast_shapes(x.shape, y.shape, (te2.shape[0], 1, 1))  # (B, H, W)
    dtype = torch.result_type(x, te2)
    ax = torch.zeros(shape, dtype=dtype, device=x.device)
    ay = torch.zeros_like(ax)
    te2, x0, y0 = (p.expand(shape[0], -1) for p in (te2, x0, y0))  # (B, K)
    step = max(1, (1 << 19) // (shape[-1] * shape[-2]))  # ~2 MB float32 buffers
    inv_r2 = torch.empty(min(step, shape[0]), *shape[-2:], dtype=dtype, device=x.device)
    for b0 in range(0, shape[0], step):
        b1 = min(b0 + step, shape[0])
        xs, ys = _images(x, b0, b1), _images(y, b0, b1)
        axs, ays, f = ax[b0:b1], ay[b0:b1], inv_r2[: b1 - b0]
        for k in range(te2.shape[1]):
            dx = xs - x0[b0:b1, k, None, None]  # (b, 1, W) on a separable grid, else (b, H, W)
            dy = ys - y0[b0:b1, k, None, None]  # (b, H, 1) on a separable grid, else (b, H, W)
            torch.add(dx * dx, dy * dy + EPS**2, out=f)
            f.reciprocal_()
            t = te2[b0:b1, k, None, None]
            axs.addcmul_(f, dx * t)
            ays.addcmul_(f, dy * t)
    return ax, ay


def _images(t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    # Per-image (B, H, W) grids are sliced; shared grids broadcast as they are.
    return t[b0:b1] if t.ndim == 3 and t.shape[0] > 1 else t


def _as_maps(a, like: torch.Tensor) -> torch.Tensor:
    # K = 0 leaves the float 0.0: return a proper zero map instead.
    return a if torch.is_tensor(a) else torch.zeros_like(like)


# Small-x series of g(x) = h(x) / x^2 for the NFW profile: sum_k x^(2k) (A_k ln(x/2) + B_k),
# used below x = 0.3 where ln(x/2) + F-term cancels badly; the truncation error there is
# ~1e-13 relative.
_NFW_A = (-1 / 2, -3 / 8, -5 / 16, -35 / 128, -63 / 256, -231 / 1024, -429 / 2048, -6435 / 32768,
          -12155 / 65536, -46189 / 262144, -88179 / 524288, -676039 / 4194304)
_NFW_B = (-1 / 4, -7 / 32, -37 / 192, -533 / 3072, -1627 / 10240, -18107 / 122880, -237371 / 1720320,
          -477745 / 3670016, -8161705 / 66060288, -155685007 / 1321205760, -156188887 / 1384120320,
          -3602044091 / 33218887680)


def _nfw_t(w: torch.Tensor) -> torch.Tensor:
    """T(w) = arctanh(sqrt w)/sqrt w for w > 0, arctan(sqrt -w)/sqrt -w for w < 0.

    With w = (1 - x) / (1 + x) this is the one analytic function behind both the arccosh
    (x < 1) and the arccos (x > 1) branches of the NFW F(x), so x = 1 (w = 0) is handled
    by its Taylor series 1 + w/3 + w^2/5 + ... instead of a 0/0.
    """
    near = w.abs() < 1e-2

    def series(e):
        return 1 + e * (1 / 3 + e * (1 / 5 + e * (1 / 7 + e * (1 / 9 + e * (1 / 11 + e / 13)))))

    def exact(e):
        pos = e > 0
        s = torch.sqrt(e.abs())
        # arctanh(1) = inf would poison the gradient of the unused branch where w -> -1.
        return torch.where(pos, torch.atanh(torch.where(pos, s, 0.0)), torch.atan(s)) / s

    return _where_safe(near, series, exact, w, 0.5)


def _nfw_g(x: torch.Tensor) -> torch.Tensor:
    """g(x) = h(x) / x^2 with h(x) = ln(x/2) + F-term, so that alpha_vec = 4 kappa_s g(x) (dx, dy)."""
    small = x < 0.3

    def series(e):
        log = torch.log(e / 2)
        e2 = e * e
        out = torch.zeros_like(e)
        for a, b in zip(reversed(_NFW_A), reversed(_NFW_B)):
            out = out * e2 + (a * log + b)
        return out

    def exact(e):
        w = (1 - e) / (1 + e)
        return (torch.log(e / 2) + 2 / (1 + e) * _nfw_t(w)) / (e * e)

    return _where_safe(small, series, exact, x, 1.0, 0.1)


def nfw_deflection(x, y, kappa_s, r_s, x0, y0):
    """Sum of K NFW haloes per image, all parameters (B, K) (or (B,) for one halo).

    kappa_s = rho_s r_s / Sigma_crit and r_s in arcsec; the convergence is
    kappa(x) = 2 kappa_s (1 - F(x)) / (x^2 - 1) with x = r / r_s, and the deflection
    alpha(r) = 4 kappa_s r_s h(x) / x with h(x) = ln(x/2) + arccosh(1/x)/sqrt(1 - x^2)
    (x < 1) or + arccos(1/x)/sqrt(x^2 - 1) (x > 1), h(1) = 1 - ln 2.
    """
    n_k, (ks, rs, x0, y0) = _deflectors(x, kappa_s, r_s, x0, y0)
    ax = ay = 0.0
    for k in range(n_k):
        dx, dy = x - _k(x0, k), y - _k(y0, k)  # (B, H, W)
        xn = torch.sqrt(dx * dx + dy * dy + EPS**2) / _k(rs, k)
        f = 4 * _k(ks, k) * _nfw_g(xn)
        ax, ay = ax + f * dx, ay + f * dy
    return _as_maps(ax, x), _as_maps(ay, x)


def vortex_deflection(x, y, mass_theta_e_sq, x0, y0, half_length, angle):
    """A uniform rod of mass (an axion "vortex"), in closed form; parameters (B,) or (B, K).

    mass_theta_e_sq is the rod's total mass as a point-mass theta_E^2 (arcsec^2), so far
    from the rod the deflection tends to that point mass. The rod runs from -half_length
    to +half_length along `angle` about (x0, y0). Integrating the point-mass kernel along
    the rod, softened like the point mass (|r|^2 -> |r|^2 + EPS^2), gives, with p along
    and d across the rod, D = sqrt(d^2 + EPS^2) and lambda = M / (2 L):
        alpha_p = lambda/2 * ln(((p + L)^2 + D^2) / ((p - L)^2 + D^2))
        alpha_d = lambda * d/D * [arctan((p + L)/D) - arctan((p - L)/D)]
    written below in forms that stay accurate far away and smooth at the rod's ends.
    """
    n_k, (m, x0, y0, hl, ang) = _deflectors(x, mass_theta_e_sq, x0, y0, half_length, angle)
    # A zero-length rod is a point mass; clamping avoids 0/0 in lambda while the
    # formulas below tend to the point-mass limit.
    hl = hl.clamp(min=1e-6)
    lam = m / (2 * hl)
    ax = ay = 0.0
    for k in range(n_k):
        cos, sin = torch.cos(_k(ang, k)), torch.sin(_k(ang, k))
        p, d = _rotate(x - _k(x0, k), y - _k(y0, k), cos, sin)  # (B, H, W) along / across
        L = _k(hl, k)
        d2 = d * d + EPS**2
        big_d = torch.sqrt(d2)
        # ln(a/b) = log1p((a - b)/b): no cancellation when the rod looks short. Near the rod's
        # far end (a/b -> 0) float rounding can push (a - b)/b to -1 or below, and log1p to NaN
        # (one image in ~15,000 on 16 threads); there ln(a/b) itself is accurate, a and b both >= EPS^2.
        ratio = 4 * p * L / ((p - L) ** 2 + d2)
        near_end = ratio < -0.5
        direct = torch.log(((p + L) ** 2 + d2) / ((p - L) ** 2 + d2))
        a_p = 0.5 * _k(lam, k) * torch.where(near_end, direct, torch.log1p(torch.where(near_end, 0.0, ratio)))
        # arctan(a) - arctan(b) = atan2(a - b, 1 + a b); first argument > 0, so no branch cut.
        a_d = _k(lam, k) * (d / big_d) * torch.atan2(2 * L * big_d, p * p + d2 - L * L)
        dax, day = _unrotate(a_p, a_d, cos, sin)
        ax, ay = ax + dax, ay + day
    return _as_maps(ax, x), _as_maps(ay, x)


# ---------------------------------------------------------------------------- cosmology

_C_M_S = 299_792_458.0
_C_KM_S = _C_M_S / 1e3
_G_SI = 6.67430e-11
_MSUN_KG = 1.988409870698051e30
_MPC_M = 3.0856775814913673e22
_ARCSEC_RAD = math.pi / 648_000


@functools.lru_cache(maxsize=64)
def _comoving_mpc(z: float, h0: float, omega_m: float) -> float:
    # Flat LambdaCDM, radiation neglected; the integrand is smooth, so the trapezoid rule
    # on a fine grid is accurate to ~1e-9.
    zs = np.linspace(0.0, z, 8193)
    inv_e = 1.0 / np.sqrt(omega_m * (1 + zs) ** 3 + (1 - omega_m))
    integral = (zs[1] - zs[0]) * (inv_e.sum() - 0.5 * (inv_e[0] + inv_e[-1])) if z > 0 else 0.0
    return float(_C_KM_S / h0 * integral)


def _distances_mpc(z_lens: float, z_source: float, h0: float, omega_m: float) -> tuple[float, float, float]:
    """Angular diameter distances D_l, D_s, D_ls (Mpc) in a flat universe."""
    if not 0 <= z_lens < z_source:
        raise ValueError(f"need 0 <= z_lens < z_source, got z_lens={z_lens}, z_source={z_source}")
    dc_l, dc_s = _comoving_mpc(z_lens, h0, omega_m), _comoving_mpc(z_source, h0, omega_m)
    return dc_l / (1 + z_lens), dc_s / (1 + z_source), (dc_s - dc_l) / (1 + z_source)


def mass_to_theta_e_sq(mass_msun, z_lens: float = 0.5, z_source: float = 1.0, h0: float = 70.0, omega_m: float = 0.3):
    """Point-mass Einstein radius squared (arcsec^2): theta_E^2 = 4 G M D_ls / (c^2 D_l D_s).

    Works on floats, numpy arrays and tensors alike (it is one multiplication).
    """
    d_l, d_s, d_ls = _distances_mpc(z_lens, z_source, h0, omega_m)
    factor = 4 * _G_SI * _MSUN_KG / _C_M_S**2 * d_ls / (d_l * d_s * _MPC_M) / _ARCSEC_RAD**2
    return mass_msun * factor


def sigma_crit_msun_per_arcsec2(
    z_lens: float = 0.5, z_source: float = 1.0, h0: float = 70.0, omega_m: float = 0.3
) -> float:
    """Critical surface density c^2 D_s / (4 pi G D_l D_ls), per arcsec^2 at the lens (Msun).

    A point mass M then has theta_E^2 = M / (pi Sigma_crit), in these units.
    """
    d_l, d_s, d_ls = _distances_mpc(z_lens, z_source, h0, omega_m)
    per_m2 = _C_M_S**2 / (4 * math.pi * _G_SI) * d_s / (d_l * d_ls * _MPC_M)  # kg / m^2
    return per_m2 * (d_l * _MPC_M * _ARCSEC_RAD) ** 2 / _MSUN_KG


# ---------------------------------------------------------------------------- light


def sersic_b(n):
    """b_n such that R_eff encloses half the light (Ciotti & Bertin 1999 asymptotic series)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n * n)


def sersic(x, y, amp, r_eff, n, q, phi, x0, y0):
    """Elliptical Sersic surface brightness, amp at the (circularised) effective radius.

    As in lenstronomy's SERSIC_ELLIPSE: R = sqrt(q x'^2 + y'^2 / q) in the frame of the
    major axis (position angle phi), I = amp exp(-b_n ((R / r_eff)^(1/n) - 1)).
    """
    amp, r_eff, n, q, phi, x0, y0 = (_per_image(p, x) for p in (amp, r_eff, n, q, phi, x0, y0))
    cos, sin = torch.cos(phi), torch.sin(phi)
    xr, yr = _rotate(x - x0, y - y0, cos, sin)  # (B, H, W)
    # EPS keeps the gradient of R^(1/n) finite at the centre when n > 1.
    r2 = q * xr * xr + yr * yr / q + EPS**2
    # (R / r_eff)^(1/n) = exp(ln(R^2 / r_eff^2) / (2n)), one exp instead of pow's two passes.
    return amp * torch.exp(-sersic_b(n) * (torch.exp(torch.log(r2 / (r_eff * r_eff)) / (2 * n)) - 1))


def ray_trace(x, y, ax, ay):
    """Lens equation: source-plane position beta = theta - alpha(theta)."""
    return x - ax, y - ay


# ---------------------------------------------------------------------------- instrument


def gaussian_psf_kernel(fwhm_arcsec, pixel_scale: float, size: int, device=None, dtype=None) -> torch.Tensor:
    """Normalised Gaussian PSF, integrated over each pixel (FWHMs near a pixel are common).

    fwhm_arcsec is a float -> (size, size), or a (B,) tensor -> (B, size, size). size
    must be odd so that the kernel is centred on a pixel.
    """
    if size % 2 != 1:
        raise ValueError(f"PSF kernel size must be odd, got {size}")
    if torch.is_tensor(fwhm_arcsec):
        device = device or fwhm_arcsec.device
        dtype = dtype or fwhm_arcsec.dtype
    dtype = dtype or torch.get_default_dtype()
    fwhm = torch.as_tensor(fwhm_arcsec, dtype=dtype, device=device)
    sigma_px = (fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel_scale).reshape(-1, 1)  # (B, 1)
    edges = torch.arange(size + 1, dtype=dtype, device=device) - size / 2  # pixel edges
    cdf = torch.special.ndtr(edges / sigma_px)  # (B, size + 1)
    p = cdf[:, 1:] - cdf[:, :-1]  # (B, size) separable 1-D pixel weights
    kernel = p[:, :, None] * p[:, None, :]  # (B, size, size)
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    return kernel[0] if fwhm.ndim == 0 else kernel


def _fft_size(n: int) -> int:
    """Smallest 5-smooth integer >= n (fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def convolve_fft(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """'Same'-size linear convolution by FFT; zero padding stops flux wrapping across edges.

    images (..., H, W); kernel (kh, kw) shared, or (B, kh, kw) per image for images
    (B, H, W) or (B, C, H, W). Odd kernel sizes keep the image centred.
    """
    h, w = images.shape[-2:]
    kh, kw = kernel.shape[-2:]
    if kernel.ndim == 3 and images.ndim == 4:
        kernel = kernel[:, None]  # (B, 1, kh, kw)
    fh, fw = _fft_size(h + kh - 1), _fft_size(w + kw - 1)
    spec = torch.fft.rfft2(images, s=(fh, fw)) * torch.fft.rfft2(kernel, s=(fh, fw))
    full = torch.fft.irfft2(spec, s=(fh, fw))  # (..., fh, fw), linear convolution
    return full[..., kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]


def _per_image_like(p, images: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=images.dtype, device=images.device)
    return p.reshape(-1, *([1] * (images.ndim - 1))) if p.ndim == 1 else p


# Read noise (in counts) above which photon noise is drawn in its Gaussian limit: Poisson(lambda) plus
# N(0, r^2) has the mean and variance of N(lambda, lambda + r^2) and a skewness of at most
# 0.385 / r (at lambda = 2 r^2): <= 0.13 from 3 counts of read noise (every Poisson preset of the
# simulator has 4 or more), and whole counts are no longer visible. The Gaussian draw costs a
# fifth of torch.poisson's, which was a quarter of the simulator's time.
READ_NOISE_SMOOTHS_COUNTS = 3.0


def add_noise(images: torch.Tensor, generator: torch.Generator, poisson_scale=None, gaussian_sigma=0.0) -> torch.Tensor:
    """Photon noise and read noise, drawn from an explicit generator.

    poisson_scale is counts per unit of image value (float or (B,)): each pixel becomes
    Poisson(image * scale) / scale. None turns it off. gaussian_sigma (float or (B,)) adds
    read noise in image units. An image whose read noise is READ_NOISE_SMOOTHS_COUNTS counts or
    more gets both in one Gaussian draw of their summed variance (see there); the others get
    whole Poisson counts plus read noise. Draws happen on the generator's device, so a CPU
    generator gives the same noise for images anywhere. The gradient passes straight through to
    the noiseless image (counts are not differentiable; their mean is).
    """
    with torch.no_grad():
        noise = _noise(images.detach(), generator, poisson_scale, gaussian_sigma)  # (B, ...) like images
    return images + noise if _tracks_grad(images) else noise.add_(images)


def _noise(images, generator, poisson_scale, gaussian_sigma) -> torch.Tensor:
    """What add_noise adds, on few buffers (the simulator's images come in cache-sized batches,
    and each extra pass over a temporary costs as much as a draw)."""
    def normal() -> torch.Tensor:
        return torch.randn(images.shape, generator=generator, device=generator.device,
                           dtype=images.dtype).to(images.device)

    read_noise = torch.is_tensor(gaussian_sigma) or bool(gaussian_sigma)
    sigma = _per_image_like(gaussian_sigma, images)  # 0-d or (B, 1, 1)
    if poisson_scale is None:
        return normal().mul_(sigma) if read_noise else torch.zeros_like(images)
    scale = _per_image_like(poisson_scale, images)  # 0-d or (B, 1, 1)
    expected = images.clamp(min=0)
    smooth = (sigma * scale >= READ_NOISE_SMOOTHS_COUNTS).flatten()  # (1,) or (B,)
    if bool(smooth.all()):
        return normal().mul_(expected.div(scale).add_(sigma * sigma).sqrt_())
    if bool(smooth.any()):  # a mixed batch: each part by its own rule, the smooth images drawn first
        noise = torch.empty_like(images)
        for rows in (smooth.nonzero().flatten(), (~smooth).nonzero().flatten()):
            noise[rows] = _noise(images[rows], generator, _rows(scale, rows), _rows(sigma, rows))
        return noise
    counts = torch.poisson(expected.mul(scale).to(generator.device), generator=generator).to(images.device, images.dtype)
    noise = counts.div_(scale).sub_(expected)  # (counts - lambda) / scale
    return noise.addcmul_(normal(), sigma) if read_noise else noise


def _rows(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return p[rows] if p.ndim and p.shape[0] > 1 else p


def sample_source_plane(source_image: torch.Tensor, beta_x, beta_y, source_pixel_scale: float, mode: str = "bilinear"):
    """A pixelated source (centred on the origin) evaluated at source-plane positions beta.

    source_image (B, C, Hs, Ws) or (B, Hs, Ws); beta_x, beta_y (B, H, W) or (H, W).
    Returns (B, C, H, W) or (B, H, W). Positions off the source grid see zero light.
    Differentiable in both the source pixels and beta (grid_sample).
    """
    squeeze = source_image.ndim == 3
    src = source_image[:, None] if squeeze else source_image  # (B, C, Hs, Ws)
    hs, ws = src.shape[-2:]
    # align_corners=False: -1 and +1 are the outer edges of the source grid.
    grid = torch.stack([beta_x / (source_pixel_scale * ws / 2), beta_y / (source_pixel_scale * hs / 2)], dim=-1)
    if grid.ndim == 3:
        grid = grid.expand(src.shape[0], *grid.shape)  # (B, H, W, 2)
    out = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="zeros", align_corners=False)
    return out[:, 0] if squeeze else out


# ---------------------------------------------------------------------------- inversion


def splat_to_source_plane(values: torch.Tensor, beta_x, beta_y, source_pixels: int, source_pixel_scale: float):
    """Image-plane values carried back to a pixelated source plane: the adjoint of ``sample_source_plane``.

    values (B, H, W), the light of each image pixel; beta_x, beta_y (B, H, W) or (H, W), where
    each pixel's ray lands. Each value is shared among the four source pixels around its
    landing point with the very bilinear weights ``sample_source_plane`` (grid_sample,
    align_corners=False) reads them with, on the same square grid of ``source_pixels`` a side
    centred on the origin; rays landing off the grid are dropped, as zero padding drops them.
    Returns (flux, weight), each (B, source_pixels, source_pixels): the splatted values and the
    splatted ones (how many rays, fractionally, each source pixel received). Their ratio is the
    reconstructed surface brightness. Differentiable in ``values`` and, through the bilinear
    weights, in beta (piecewise linear: kinks where a ray crosses a pixel centre line).
    """
    n = source_pixels
    beta_x, beta_y = torch.broadcast_tensors(beta_x, beta_y)
    if beta_x.ndim == 2:
        beta_x, beta_y = beta_x.expand(values.shape[0], -1, -1), beta_y.expand(values.shape[0], -1, -1)
    b = values.shape[0]
    # grid_sample's pixel coordinate for align_corners=False: beta / scale + (n - 1) / 2.
    px = (beta_x / source_pixel_scale + (n - 1) / 2).reshape(b, -1)  # (B, H*W)
    py = (beta_y / source_pixel_scale + (n - 1) / 2).reshape(b, -1)
    x0, y0 = torch.floor(px.detach()), torch.floor(py.detach())
    fx, fy = px - x0, py - y0  # (B, H*W) in [0, 1): the only path for gradients to beta
    v = values.reshape(b, -1).to(fx.dtype)
    offsets = torch.arange(b, device=values.device)[:, None] * n * n  # (B, 1) into the flat (B*n*n,) plane
    flux = torch.zeros(b * n * n, dtype=fx.dtype, device=values.device)
    weight = torch.zeros_like(flux)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx < n) & (cy >= 0) & (cy < n)
        index = (offsets + (cy.clamp(0, n - 1) * n + cx.clamp(0, n - 1)).long()).flatten()
        w = torch.where(inside, w, 0.0)
        flux = flux.index_add(0, index, (w * v).flatten())
        weight = weight.index_add(0, index, w.flatten())
    return flux.reshape(b, n, n), weight.reshape(b, n, n)


def inverse_magnification(ax: torch.Tensor, ay: torch.Tensor, pixel_scale: float) -> torch.Tensor:
    """det(d beta / d theta) = 1 / mu of the lens map, from a deflection field on a pixel grid.

    ax, ay (..., H, W) on a ``pixel_grid`` of ``pixel_scale``; the derivatives are central
    differences (one-sided, second order, at the border). Its zero contour is the critical
    curve: where images are infinitely magnified, the ring of an Einstein-radius lens.
    """
    dax_dy, dax_dx = torch.gradient(ax, spacing=pixel_scale, dim=(-2, -1), edge_order=2)
    day_dy, day_dx = torch.gradient(ay, spacing=pixel_scale, dim=(-2, -1), edge_order=2)
    return (1 - dax_dx) * (1 - day_dy) - dax_dy * day_dx
