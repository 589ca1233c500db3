"""A synthetic breast-ultrasound dataset in BUSI layout: B-mode images formed
from a scatterer model, with lesion masks.

The anatomy (tissue layers, BI-RADS lesion outlines) is in `anatomy.py`;
this file forms the image, in the order a scanner does:

1. scatterers: complex Gaussian, one per sample, with power = echogenicity;
2. point-spread function: the IQ (demodulated) pulse-echo response, a separable
   Gaussian, sigma_z axially (pulse length) and sigma_x laterally (beam width,
   FWHM = lambda F#); it is applied in the Fourier domain. Summing many
   random-phase scatterers makes the envelope |IQ| Rayleigh distributed: fully
   developed speckle (Wagner et al., IEEE Trans. Sonics Ultrason. 30(3), 1983);
3. attenuation along each beam (round trip, 2 f alpha z), compensated by
   time-gain compensation (TGC) with random error and slider settings;
4. log compression with a random gain and dynamic range;
5. for a curvilinear probe, scan conversion of the beams into a fan.

Lesion brightness is deliberately not a class cue: the lesion's scattering
strength k is solved (bisection on the final grey levels) so that its mean
grey level equals a target drawn from one distribution for both classes.
Benign and malignant lesions differ in shape, margin, internal texture and
posterior features, as the BI-RADS lexicon describes.

Site `a` stands in for BUSI (Dataset A), site `b` for the Kaggle test set
(Dataset B): another frequency, speckle size, gain, a curvilinear probe, and
the rotation and sharpening that set was augmented with.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from meddap.data import anatomy
from meddap.errors import MeddapError
from meddap.io import write_bytes_atomic, write_json_atomic
from meddap.progress import progress

SPEED_OF_SOUND_MM_PER_US = 1.54      # soft tissue, 1540 m/s
FWHM_PER_SIGMA = 2.3548              # 2 sqrt(2 ln 2) for a Gaussian
TGC_ATTENUATION = 0.6                # dB/(cm MHz): the tissue average the operator compensates
HEADROOM_DB = 22.0                   # gland's mean level sits this far below full white at 0 dB gain
LESION_GREY = (18.0, 80.0)           # target mean grey of a lesion, both classes
MALIGNANT_HETEROGENEITY = 0.8        # std of log echogenicity inside malignant lesions
ECHO_FOCUS = 40.0                    # relative power of a microcalcification sample
CLASSES = ("benign", "malignant", "normal")


class Site(Enum):
    A = "a"   # BUSI-like: linear probe (Dataset A)
    B = "b"   # Dataset-B-like: curvilinear probe, rotated and sharpened


class Geometry(Enum):
    LINEAR = "linear"
    CURVILINEAR = "curvilinear"


@dataclass(frozen=True, kw_only=True)
class Probe:
    frequency_mhz: float
    geometry: Geometry
    depth_mm: float
    width_mm: float              # linear: aperture; curvilinear: ignored (the fan sets it)
    apex_radius_mm: float        # curvilinear: radius of the probe face
    half_angle_deg: float        # curvilinear: half the fan's opening angle
    f_number: float              # lateral beam width FWHM = lambda F#
    pulse_cycles: float          # axial pulse length at -6 dB, in cycles of the centre frequency
    gain_db: tuple[float, float]
    dynamic_range_db: tuple[float, float]
    rotation_deg: float          # +-range of the Dataset-B rotation (0: none)
    sharpen: bool                # Dataset-B unsharp masking

    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_MM_PER_US / self.frequency_mhz


PROBES = {
    Site.A: Probe(frequency_mhz=7.5, geometry=Geometry.LINEAR, depth_mm=38.0, width_mm=38.0,
                  apex_radius_mm=0.0, half_angle_deg=0.0, f_number=3.0, pulse_cycles=3.0,
                  gain_db=(-4.0, 4.0), dynamic_range_db=(50.0, 65.0), rotation_deg=0.0,
                  sharpen=False),
    Site.B: Probe(frequency_mhz=4.5, geometry=Geometry.CURVILINEAR, depth_mm=45.0, width_mm=0.0,
                  apex_radius_mm=30.0, half_angle_deg=20.0, f_number=4.0, pulse_cycles=3.5,
                  gain_db=(-1.0, 7.0), dynamic_range_db=(42.0, 55.0), rotation_deg=20.0,
                  sharpen=True),
}
# BUSI's class counts (paper_facts.md, Data) and Dataset B's test set.
DEFAULT_COUNTS = {Site.A: {"benign": 437, "malignant": 210, "normal": 133},
                  Site.B: {"benign": 500, "malignant": 400}}


@dataclass(frozen=True)
class BeamGrid:
    x: np.ndarray          # (S, S) mm lateral position of each beam sample
    z: np.ndarray          # (S, S) mm depth below the skin (rows: along the beam)
    axial_mm: float        # sample spacing along a beam
    lateral_mm: float      # beam spacing (at mid depth for a fan)


def beam_grid(probe: Probe, size: int) -> BeamGrid:
    """Sample positions of `size` beams x `size` depths, in mm."""
    rho = np.linspace(0, probe.depth_mm, size, dtype=np.float32)
    if probe.geometry is Geometry.LINEAR:
        lat = np.linspace(-probe.width_mm / 2, probe.width_mm / 2, size, dtype=np.float32)
        z, x = np.meshgrid(rho, lat, indexing="ij")                   # (S, S) each
        return BeamGrid(x, z, probe.depth_mm / (size - 1), probe.width_mm / (size - 1))
    phi_max = np.deg2rad(probe.half_angle_deg)
    phi = np.linspace(-phi_max, phi_max, size, dtype=np.float32)
    r = probe.apex_radius_mm + rho[:, None]                           # (S, 1)
    x, z = r * np.sin(phi)[None], r * np.cos(phi)[None] - probe.apex_radius_mm   # (S, S)
    mid = probe.apex_radius_mm + probe.depth_mm / 2
    return BeamGrid(x, z, probe.depth_mm / (size - 1), mid * 2 * phi_max / (size - 1))


def psf_transfer(probe: Probe, grid: BeamGrid, size: int) -> np.ndarray:
    """Fourier transform of the IQ point-spread function, (S, S) float32,
    normalised to unit energy (sum h^2 = mean |H|^2 = 1, Parseval) so that
    tissue of echogenicity 1 has E|IQ|^2 = 1.

    h(z, x) = exp(-z^2 / 2 sigma_z^2 - x^2 / 2 sigma_x^2): the envelope of a
    Gaussian-modulated pulse, sigma_z = (pulse_cycles lambda / 2) / FWHM_PER_SIGMA
    (round trip halves the length), sigma_x = lambda F# / FWHM_PER_SIGMA.
    """
    lam = probe.wavelength_mm
    sz = probe.pulse_cycles * lam / 2 / FWHM_PER_SIGMA / grid.axial_mm      # px
    sx = lam * probe.f_number / FWHM_PER_SIGMA / grid.lateral_mm             # px
    k = np.fft.fftfreq(size).astype(np.float32)                              # cycles / px
    h = np.exp(-2 * np.pi ** 2 * (sz ** 2 * k[:, None] ** 2 + sx ** 2 * k[None] ** 2))
    return (h / np.sqrt(np.mean(h ** 2))).astype(np.float32)


def _grey(iq_db: np.ndarray, offset_db: np.ndarray, dynamic_range: float) -> np.ndarray:
    """Log compression: 0 dB at HEADROOM_DB below white, `dynamic_range` dB to black."""
    return np.clip((iq_db + offset_db + dynamic_range - HEADROOM_DB) * (255.0 / dynamic_range),
                   0.0, 255.0)


def _solve_lesion_gain(bg: np.ndarray, les: np.ndarray, offset: np.ndarray, dr: float,
                       target: float) -> float:
    """k such that mean grey(|bg + k les|) over the lesion's samples = target
    (bisection on log10 k; the mean is monotone in k where les dominates)."""
    lo, hi = -3.0, 1.5
    for _ in range(18):
        mid = (lo + hi) / 2
        iq_db = 20 * np.log10(np.abs(bg + 10 ** mid * les) + 1e-12)
        if _grey(iq_db, offset, dr).mean() < target:
            lo = mid
        else:
            hi = mid
    return 10 ** ((lo + hi) / 2)


def _place_lesion(rng: np.random.Generator, malignant: bool, probe: Probe,
                  tissue: anatomy.Tissue) -> anatomy.Lesion:
    radius, edge = anatomy.lesion_outline(rng, malignant)
    lesion = anatomy.Lesion(cx=0.0, cz=0.0, radius=radius, malignant=malignant, edge_mm=edge)
    half_w, half_h = lesion.extent
    d = probe.depth_mm
    cz_lo = max(tissue.gland_top + 0.3 * half_h, half_h + 1.5)
    cz_hi = min(tissue.muscle_top - 0.2 * half_h, d - half_h - 2.0)
    cz = rng.uniform(cz_lo, cz_hi) if cz_hi > cz_lo else min(max(d / 2, half_h + 1.5), d - half_h)
    if probe.geometry is Geometry.LINEAR:
        room = probe.width_mm / 2
    else:
        room = (probe.apex_radius_mm + cz) * np.sin(np.deg2rad(probe.half_angle_deg))
    cx = rng.uniform(-1, 1) * max(room - half_w - 1.0, 0.0) * 0.8
    return anatomy.Lesion(cx=float(cx), cz=float(cz), radius=radius, malignant=malignant,
                         edge_mm=edge)


def simulate(rng: np.random.Generator, label: str, probe: Probe, size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image and its lesion mask, both (size, size) uint8 (mask 0/255)."""
    grid = beam_grid(probe, size)
    tissue = anatomy.tissue_layers(rng, grid.x, grid.z, probe.depth_mm, grid.axial_mm)
    echo_bg, echo_les, att = tissue.echo, np.zeros_like(tissue.echo), tissue.attenuation
    lesion, inside = None, None
    if label in ("benign", "malignant"):
        lesion = _place_lesion(rng, label == "malignant", probe, tissue)
        rho, r = lesion.polar(grid.x, grid.z)
        inside = rho <= r
        w = np.clip(0.5 + (r - rho) / lesion.edge_mm, 0, 1).astype(np.float32)   # soft margin
        if lesion.malignant:
            # Heterogeneous interior: lognormal exp(s n - s^2 / 2), mean 1;
            # echogenic foci (microcalcifications); an echogenic halo outside.
            s = MALIGNANT_HETEROGENEITY
            noise = anatomy.smooth_noise(rng, w.shape, 0.6 / grid.axial_mm)
            texture = np.exp(s * noise - s * s / 2)
            foci = rng.random(w.shape) < rng.uniform(0, 0.004)
            texture = np.where(foci & inside, ECHO_FOCUS, texture)
            halo_mm = rng.uniform(0.8, 2.0)
            halo = np.exp(-np.square((rho - r - halo_mm / 2) / (halo_mm / 2))) * (rho > r)
            echo_bg = echo_bg * (1 + rng.uniform(1.0, 3.0) * halo)
            att_les = rng.uniform(*anatomy.ATT_MALIGNANT)
        else:
            texture = np.ones_like(w)
            att_les = rng.uniform(*anatomy.ATT_BENIGN)
        echo_les = texture * w
        echo_bg = echo_bg * (1 - w)
        att = att * (1 - w) + att_les * w

    # 1-2. Scatterers (unit-power complex Gaussian) through the PSF, background
    # and lesion apart so the lesion's strength can be set afterwards.
    n = rng.standard_normal((2, size, size), dtype=np.float32) * np.float32(np.sqrt(0.5))
    scat = (n[0] + 1j * n[1]).astype(np.complex64)                         # (S, S), E|.|^2 = 1
    fields = np.stack([scat * np.sqrt(echo_bg), scat * np.sqrt(echo_les)])   # (2, S, S)
    if lesion is None:
        fields = fields[:1]                                                  # (1, S, S)
    import scipy.fft  # here, not at the top: every command's parser imports this module

    iq = scipy.fft.ifft2(scipy.fft.fft2(fields) * psf_transfer(probe, grid, size))   # complex64
    # 3. Attenuation (round trip: 2 f alpha z) and TGC with slider error (dB).
    f = probe.frequency_mhz
    depth_cm = np.arange(size, dtype=np.float32)[:, None] * grid.axial_mm / 10      # (S, 1)
    loss = 2 * f * np.cumsum(att, axis=0) * (grid.axial_mm / 10)                     # (S, S)
    sliders = np.interp(np.arange(size), np.linspace(0, size - 1, 8), rng.uniform(-2, 2, 8))
    tgc = 2 * f * TGC_ATTENUATION * rng.uniform(0.85, 1.15) * depth_cm + sliders[:, None]
    offset = (tgc - loss + rng.uniform(*probe.gain_db)).astype(np.float32)
    dr = rng.uniform(*probe.dynamic_range_db)
    # 4. Lesion strength for a class-independent mean grey level, then log compression.
    k = 0.0
    if lesion is not None:
        k = _solve_lesion_gain(iq[0][inside], iq[1][inside], offset[inside], dr,
                               rng.uniform(*LESION_GREY))
    grey = _grey(20 * np.log10(np.abs(iq[0] + k * iq[-1]) + 1e-12), offset, dr)
    # 5. Geometry: a curvilinear probe's beams are scan-converted into a fan.
    mask = inside
    if probe.geometry is Geometry.CURVILINEAR:
        grey, mask = _scan_convert(grey, probe, size, lesion)
    image = Image.fromarray(np.round(grey).astype(np.uint8))
    mask_im = Image.fromarray((mask if mask is not None else np.zeros((size, size), bool))
                              .astype(np.uint8) * 255)
    if probe.rotation_deg:
        angle = rng.uniform(-probe.rotation_deg, probe.rotation_deg)
        image = image.rotate(angle, Image.Resampling.BILINEAR)
        mask_im = mask_im.rotate(angle, Image.Resampling.NEAREST)
    if probe.sharpen:
        image = image.filter(ImageFilter.UnsharpMask(2, int(rng.integers(80, 200)), 3))
    return np.asarray(image), np.asarray(mask_im)


def _scan_convert(grey: np.ndarray, probe: Probe, size: int, lesion: anatomy.Lesion | None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample beams (depth, angle) onto a square Cartesian image holding the fan;
    the mask is rasterised exactly on the output pixels."""
    r0, d, phi_max = probe.apex_radius_mm, probe.depth_mm, np.deg2rad(probe.half_angle_deg)
    top = r0 * np.cos(phi_max) - r0                                    # fan corners' depth (< 0)
    side = max(d - top, 2 * (r0 + d) * np.sin(phi_max))
    zs = np.linspace(top, top + side, size, dtype=np.float32)
    xs = np.linspace(-side / 2, side / 2, size, dtype=np.float32)
    z, x = np.meshgrid(zs, xs, indexing="ij")                          # (S, S) each
    rho = np.hypot(x, z + r0) - r0
    phi = np.arctan2(x, z + r0)
    rows = rho / d * (size - 1)
    cols = (phi + phi_max) / (2 * phi_max) * (size - 1)
    from scipy import ndimage  # here, not at the top: every command's parser imports this module

    out = ndimage.map_coordinates(grey, [rows, cols], order=1, mode="constant", cval=0.0)
    in_fan = (rho >= 0) & (rho <= d) & (np.abs(phi) <= phi_max)
    mask = None
    if lesion is not None:
        lr, lt = lesion.polar(x, z)
        mask = (lr <= lt) & in_fan
    return np.where(in_fan, out, 0.0), mask


def image_rng(seed: int, site: Site, label: str, index: int) -> np.random.Generator:
    """The generator of one image, keyed by (seed, site, class, index): changing
    the counts of one class never changes another image."""
    site_key = list(Site).index(site)
    return np.random.default_rng(np.random.SeedSequence([seed, site_key, CLASSES.index(label), index]))


def parse_counts(text: str) -> dict[str, int]:
    """'benign=437,malignant=210,normal=133' -> {'benign': 437, ...}."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in CLASSES:
            raise MeddapError(f"--counts entry {part!r} is not CLASS=N with CLASS one of "
                              f"{', '.join(CLASSES)}; e.g. benign=437,malignant=210,normal=133.")
        try:
            counts[name] = int(value)
        except ValueError:
            raise MeddapError(f"--counts entry {part!r}: {value!r} is not a whole number.") from None
        if counts[name] < 0:
            raise MeddapError(f"--counts entry {part!r}: a count must be 0 or more.")
    if not counts:
        raise MeddapError(f"--counts {text!r} names no class; e.g. benign=437,malignant=210,normal=133.")
    return counts


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_phantom(out: str | Path, seed: int = 0, site: Site = Site.A, size: int = 256,
                  counts: dict[str, int] | None = None, show_progress: bool = True) -> dict:
    """Write `out/{class}/{class} (k).png` and `{class} (k)_mask.png` (k from 1,
    BUSI's naming) and `out/phantom.json` with the settings. Returns that record."""
    if not 32 <= size <= 2048:
        raise MeddapError(f"--size {size} is out of range; use 32 to 2048 pixels (BUSI-like: 256).")
    if seed < 0:
        raise MeddapError(f"--seed {seed} must be 0 or more.")
    counts = dict(DEFAULT_COUNTS[site] if counts is None else counts)
    probe = PROBES[site]
    out = Path(out)
    jobs = [(c, k) for c in CLASSES if c in counts for k in range(1, counts[c] + 1)]
    for label, k in progress(jobs, desc=f"phantom site {site.value}", enabled=show_progress):
        image, mask = simulate(image_rng(seed, site, label, k), label, probe, size)
        write_bytes_atomic(out / label / f"{label} ({k}).png", png_bytes(image))
        write_bytes_atomic(out / label / f"{label} ({k})_mask.png", png_bytes(mask))
    probe_record = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(probe).items()}
    record = {"generator": "meddap phantom", "seed": seed, "site": site.value, "size": size,
              "counts": counts, "probe": probe_record}
    write_json_atomic(out / "phantom.json", record)
    return record
