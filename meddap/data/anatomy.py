"""Anatomy of the breast phantom: tissue layers and lesion outlines.

Everything here is a function of physical coordinates in millimetres: `x` is
lateral (0 under the probe's centre), `z` is depth (0 at the skin). Both are
arrays of any (equal) shape, so the same anatomy can be sampled on a linear
probe's rectangular grid or along a curvilinear probe's fan of beams.

The anatomy returns two maps that the image formation in `phantom.py` uses:
- echogenicity: mean backscattered power relative to fibroglandular tissue (= 1);
- attenuation: in dB / (cm MHz), one way.

Layers, from the skin down (Stavros, "Breast Ultrasound", 2004, ch. 3; values
are typical relative levels, not measurements): skin (echogenic dermis),
subcutaneous fat in lobules separated by echogenic septa, Cooper's ligaments
running from the skin to peaks of the fibroglandular layer, fibroglandular
tissue (echogenic, textured), retromammary fat, and the pectoralis muscle
(striated) under its bright fascia.

Lesion outlines follow the BI-RADS ultrasound lexicon (ACR BI-RADS Atlas, 5th
ed., 2013): benign masses are oval or round, circumscribed and parallel to the
skin (wider than tall); malignant masses are irregular with angular or
spiculated margins and non-parallel (taller than wide). Both classes draw
their size from the same distribution, so size does not tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relative backscattered power (fibroglandular tissue = 1).
ECHO_SKIN = 1.6
ECHO_FAT = 0.12            # fat is hypoechoic, about -9 dB below gland
ECHO_SEPTUM = 2.5          # fat septa, Cooper's ligaments, pectoral fascia
ECHO_MUSCLE = 0.35
# One-way attenuation in dB/(cm MHz) (Duck, "Physical Properties of Tissue", 1990).
ATT_FAT, ATT_GLAND, ATT_SKIN, ATT_MUSCLE = 0.48, 0.75, 0.6, 1.0
ATT_BENIGN = (0.05, 0.3)     # fluid-like: less than gland -> posterior enhancement
ATT_MALIGNANT = (1.2, 2.0)   # desmoplastic: more than gland -> posterior shadowing

N_THETA = 720                                 # samples of a lesion outline r(theta)
LESION_RADIUS_MM = (2.8, 7.5)                 # equivalent radius sqrt(area/pi), log-uniform
BENIGN_ASPECT = (1.25, 2.0)                   # width / height: parallel
MALIGNANT_ASPECT = (0.55, 1.1)                # mostly taller than wide: non-parallel


def _upsample_linear(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a coarse grid spanning the output's extent onto
    `shape`, one axis at a time with element-wise weights (no BLAS threads)."""
    out = coarse
    for axis, n_out in enumerate(shape):
        pos = np.linspace(0, out.shape[axis] - 1, n_out, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), out.shape[axis] - 2)
        w = pos - lo                                                     # (n_out,)
        w = w[:, None] if axis == 0 else w[None, :]
        a, b = np.take(out, lo, axis=axis), np.take(out, lo + 1, axis=axis)
        out = a * (1 - w) + b * w
    return out                                                           # shape


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], corr_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise with correlation length about
    `corr_px` pixels: white noise on a grid `corr_px` times coarser, lightly
    blurred and linearly interpolated up."""
    coarse = (max(2, int(shape[0] / corr_px) + 2), max(2, int(shape[1] / corr_px) + 2))
    from scipy import ndimage  # here, not at the top: every command's parser imports this module

    n = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.7)
    fine = _upsample_linear(n, shape)                                    # (H, W)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def random_curve(rng: np.random.Generator, x: np.ndarray, mean: float, amplitude: float,
                 period_mm: float = 60.0, harmonics: int = 3) -> np.ndarray:
    """A smooth random boundary z = mean + sum_k a_k sin(2 pi k x / period + phi_k)."""
    z = np.full_like(x, mean)
    for k in range(1, harmonics + 1):
        a = amplitude * rng.uniform(0.3, 1.0) / k
        z += a * np.sin(2 * np.pi * k * x / period_mm + rng.uniform(0, 2 * np.pi))
    return z


def _band(d: np.ndarray, width: float) -> np.ndarray:
    """A thin bright line: exp(-(d / width)^2) of the distance d from it."""
    return np.exp(-np.square(d / width))


@dataclass(frozen=True)
class Tissue:
    echo: np.ndarray          # (..., ) relative backscattered power
    attenuation: np.ndarray   # (..., ) dB / (cm MHz), one way
    gland_top: float          # mm: mean depth of the fibroglandular layer's top
    muscle_top: float         # mm: mean depth of the pectoral fascia


def tissue_layers(rng: np.random.Generator, x: np.ndarray, z: np.ndarray, depth_mm: float,
                  pixel_mm: float) -> Tissue:
    """Echogenicity and attenuation of normal breast tissue at (x, z) in mm."""
    d = depth_mm
    skin = random_curve(rng, x, rng.uniform(1.2, 2.2), 0.3)
    gland_top_mean = rng.uniform(0.12, 0.28) * d
    gland_top = random_curve(rng, x, gland_top_mean, 0.06 * d)
    muscle_top_mean = rng.uniform(0.72, 0.86) * d
    muscle_top = random_curve(rng, x, muscle_top_mean, 0.05 * d, period_mm=90.0)
    retro = muscle_top - rng.uniform(0.8, 2.5)        # retromammary fat above the fascia

    # Cooper's ligaments tent the gland up towards the skin.
    peaks = rng.uniform(x.min(), x.max(), size=int(rng.integers(3, 7)))
    for xp in peaks:
        gland_top -= rng.uniform(0.3, 0.8) * (gland_top_mean - 3) * np.exp(-np.abs(x - xp) / 1.5)

    fat = (z > skin) & (z < gland_top)
    gland = (z >= gland_top) & (z < retro)
    muscle = z >= muscle_top

    # Fat lobules: an anisotropic Voronoi tessellation (lobules wider than
    # tall); septa where the two nearest seeds are about equally far.
    n_seeds = 24
    sx = rng.uniform(x.min(), x.max(), n_seeds)
    sz = rng.uniform(0, gland_top_mean + 4, n_seeds)
    xf, zf = x[fat], z[fat]                                          # (F,) fat samples only
    dist = np.sqrt(np.square((xf[None] - sx[:, None]) / 1.8)
                   + np.square(zf[None] - sz[:, None]))              # (n_seeds, F)
    two = np.partition(dist, 1, axis=0)[:2]                          # (2, F) nearest two
    lobule_level = rng.uniform(0.7, 1.3, n_seeds)[np.argmin(dist, axis=0)]   # (F,)

    texture = np.exp(0.45 * smooth_noise(rng, x.shape, 1.2 / pixel_mm))   # lognormal, gland
    fat_islands = smooth_noise(rng, x.shape, 3.0 / pixel_mm) > 1.1
    echo = np.full(x.shape, ECHO_FAT, np.float32)
    echo[fat] = ECHO_FAT * lobule_level + ECHO_SEPTUM * _band(two[1] - two[0], 0.25)
    echo = np.where(gland & ~fat_islands, texture, echo)
    # Pectoralis: striated muscle, fibres oblique to the skin.
    angle = rng.uniform(-0.35, 0.35)
    fibres = 0.5 + 0.5 * np.cos(2 * np.pi * (z * np.cos(angle) + x * np.sin(angle)) / 0.9)
    echo = np.where(muscle, ECHO_MUSCLE * (0.4 + 1.2 * fibres ** 4), echo)
    echo = np.where(z <= skin, ECHO_SKIN, echo)
    lines = np.maximum(_band(z - muscle_top, 0.3), _band(z - skin, 0.25))
    for xp in peaks:
        top_z = float(np.interp(xp, x[0], gland_top[0]))       # x[0]: shallowest row, ascending
        slant = rng.uniform(-0.6, 0.6)
        along = (z < top_z + 0.5) & (z > skin)
        lines = np.maximum(lines, along * _band(x - xp - slant * (top_z - z), 0.2))
    echo = np.maximum(echo, ECHO_SEPTUM * lines).astype(np.float32)

    att = np.where(fat, ATT_FAT, ATT_GLAND)
    att = np.where(muscle, ATT_MUSCLE, att)
    att = np.where(z <= skin, ATT_SKIN, att).astype(np.float32)
    return Tissue(echo, att, float(gland_top_mean), float(muscle_top_mean))


@dataclass(frozen=True)
class Lesion:
    """A star-shaped outline r(theta) around a centre, in mm. theta is measured
    from the +x (lateral) axis towards +z (depth)."""
    cx: float
    cz: float
    radius: np.ndarray    # (N_THETA,) mm
    malignant: bool
    edge_mm: float        # width of the margin's transition: sharp (circumscribed) or indistinct

    @property
    def extent(self) -> tuple[float, float]:
        """Half width and half height of the outline's bounding box (mm)."""
        theta = np.linspace(0, 2 * np.pi, N_THETA, endpoint=False)
        return (float(np.abs(self.radius * np.cos(theta)).max()),
                float(np.abs(self.radius * np.sin(theta)).max()))

    def polar(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rho, r(theta)) at each point: its distance from the centre and the
        outline's radius in its direction. Inside the lesion: rho <= r."""
        dx, dz = x - self.cx, z - self.cz
        theta_grid = np.linspace(0, 2 * np.pi, N_THETA, endpoint=False)
        r = np.interp(np.arctan2(dz, dx), theta_grid, self.radius, period=2 * np.pi)
        return np.hypot(dx, dz), r


def _ellipse_radius(theta: np.ndarray, aspect: float, tilt: float) -> np.ndarray:
    """Radius of an ellipse of unit area/pi (a b = 1) with width/height = aspect."""
    a, b = np.sqrt(aspect), 1 / np.sqrt(aspect)
    c, s = np.cos(theta - tilt), np.sin(theta - tilt)
    return 1 / np.sqrt(np.square(c / a) + np.square(s / b))


def lesion_outline(rng: np.random.Generator, malignant: bool) -> tuple[np.ndarray, float]:
    """r(theta) of a BI-RADS benign or malignant mass, scaled to an equivalent
    radius drawn from one distribution for both classes; and the margin width.

    benign:    oval, parallel (width/height in BENIGN_ASPECT), smooth, at most
               gently lobulated (2-3 undulations), sharp margin;
    malignant: non-parallel (width/height in MALIGNANT_ASPECT), irregular with
               angular corners (a polar polygon) and spicules, indistinct margin.
    """
    theta = np.linspace(0, 2 * np.pi, N_THETA, endpoint=False)
    if not malignant:
        r = _ellipse_radius(theta, rng.uniform(*BENIGN_ASPECT), rng.normal(0, 0.12))
        for k in (2, 3, 4):
            r *= 1 + rng.uniform(0, 0.03) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:   # macrolobulated: still circumscribed (BI-RADS 3)
            r *= 1 + rng.uniform(0.03, 0.06) * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
        edge = rng.uniform(0.05, 0.15)
    else:
        r = _ellipse_radius(theta, rng.uniform(*MALIGNANT_ASPECT), rng.normal(0, 0.3))
        n_corners = int(rng.integers(5, 10))                      # angular margin
        corners = np.sort(rng.uniform(0, 2 * np.pi, n_corners))
        scale = rng.uniform(0.55, 1.2, n_corners)
        r *= np.interp(theta, corners, scale, period=2 * np.pi)
        for _ in range(int(rng.integers(2, 15))):                 # spicules
            centre, half = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.08)
            gap = np.abs((theta - centre + np.pi) % (2 * np.pi) - np.pi)
            r += rng.uniform(0.15, 0.7) * np.clip(1 - gap / half, 0, None)
        edge = rng.uniform(0.3, 0.7)
    area = 0.5 * np.square(r).mean() * 2 * np.pi     # polar area: (1/2) integral r^2 dtheta
    r_eq = np.exp(rng.uniform(*np.log(LESION_RADIUS_MM)))
    return r * (r_eq / np.sqrt(area / np.pi)), float(edge)
