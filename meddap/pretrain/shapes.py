"""A procedurally generated, captioned image domain for pretraining the `tiny` base.

It stands in for the natural images (LAION) that SD v1.4 was pretrained on,
and holds two kinds of scene (`field_fraction` of them grey fields; the shipped
tiny base was trained with 0.8, and its decoder then on grey fields alone):

- shapes: coloured and grey geometric shapes on textured backgrounds,
  "a small red ellipse on a striped blue background";
- grey fields: band-limited random fields (correlation length 0.6-7 px at
  64 px; Gaussian, uniform, exponential or log-normal amplitudes; contrast
  15-70%), optionally under a smooth gradient, with soft-edged textured blobs,
  wavy bands, lines and grey shapes on top,
  "a grainy gray field with a gradient, a small dark blob and a thin white line".

The fields are generic image statistics (the texture of photographs, film
grain, clouds), so the autoencoder learns to draw grey scenes at every scale,
down to the block means of texture too fine for its 8 x 8 latent. The domain
deliberately holds no ultrasound: no scatterers, no point-spread function or
beam geometry, no tissue layers, no lesion model and none of the words of the
MEDDAP prompts ("ultrasound", "tumor", "breast", "benign", "malignant"), so
USLoRA really has to adapt the base to a new domain.

Each sample is a pure function of (seed, index): `caption_and_image(seed, k)`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, special

# name -> RGB; greys are included so the autoencoder also learns grey scenes.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40), "green": (52, 160, 64), "blue": (40, 80, 210), "yellow": (240, 210, 50),
    "orange": (240, 140, 30), "purple": (130, 50, 170), "pink": (240, 130, 180), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (128, 128, 128), "dark gray": (60, 60, 60), "light gray": (190, 190, 190),
}
SHAPES = ("circle", "ellipse", "square", "rectangle", "triangle", "star", "ring", "cross", "blob")
SIZES = {"small": (0.15, 0.25), "medium": (0.25, 0.38), "large": (0.38, 0.55)}   # fraction of the side
TEXTURES = ("plain", "striped", "dotted", "noisy", "checkered", "gradient", "grainy")

SUPERSAMPLE = 2    # shapes are drawn at 2x and box-downsampled, for smooth edges


def _background(rng: np.random.Generator, texture: str, rgb, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 255]: a texture modulating the base colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.asarray(rgb, np.float32)
    if texture == "plain":
        m = np.ones((size, size), np.float32)
    elif texture == "striped":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 8)
        m = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))))
    elif texture == "dotted":
        freq = rng.integers(4, 9)
        m = 1.0 - 0.4 * ((np.sin(np.pi * freq * xx) * np.sin(np.pi * freq * yy)) > 0.7)
    elif texture == "checkered":
        freq = rng.integers(2, 6)
        m = 0.7 + 0.3 * ((np.floor(xx * freq) + np.floor(yy * freq)) % 2)
    elif texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        m = 0.5 + 0.5 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) + 0.5)
    elif texture == "noisy":            # smooth random field: blocky noise, bilinear upsampled
        coarse = rng.uniform(0.5, 1.1, (8, 8)).astype(np.float32)
        m = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    else:                               # grainy: independent per-pixel noise
        m = rng.uniform(0.6, 1.1, (size, size)).astype(np.float32)
    return np.clip(m[..., None] * base + (1 - m[..., None]) * 40.0, 0, 255)


def _polygon(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes (triangle, star, blob), rotated at random."""
    rot = rng.uniform(0, 2 * np.pi)
    if shape == "triangle":
        angles, radii = rot + np.arange(3) * 2 * np.pi / 3, np.full(3, r)
    elif shape == "star":
        angles, radii = rot + np.arange(10) * np.pi / 5, np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:                               # blob: a smooth random radius function
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        radii = r * (1 + 0.25 * np.sin(2 * angles + rot) + 0.15 * np.sin(3 * angles + 2 * rot))
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb,
                rng: np.random.Generator) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "ellipse":
        ax, ay = (r, 0.55 * r) if rng.random() < 0.5 else (0.55 * r, r)
        draw.ellipse([cx - ax, cy - ay, cx + ax, cy + ay], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=rgb)
    elif shape == "rectangle":
        ax, ay = (r, 0.5 * r) if rng.random() < 0.5 else (0.5 * r, r)
        draw.rectangle([cx - ax, cy - ay, cx + ax, cy + ay], fill=rgb)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=max(2, int(0.35 * r)))
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng), fill=rgb)


def _shapes_scene(rng: np.random.Generator, size: int) -> tuple[str, Image.Image]:
    """One or two shapes; the caption names each shape's size, colour and kind, and
    the background's texture and colour."""
    names = list(COLOURS)
    bg_name, texture = names[rng.integers(len(names))], TEXTURES[rng.integers(len(TEXTURES))]
    big = size * SUPERSAMPLE
    bg = _background(rng, texture, COLOURS[bg_name], size)
    canvas = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    phrases = []
    for _ in range(1 + int(rng.random() < 0.35)):
        colour = names[rng.integers(len(names))]
        while colour == bg_name:
            colour = names[rng.integers(len(names))]
        shape, size_name = SHAPES[rng.integers(len(SHAPES))], list(SIZES)[rng.integers(len(SIZES))]
        r = rng.uniform(*SIZES[size_name]) * big / 2
        cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour], rng)
        phrases.append(f"a {size_name} {colour} {shape}")
    image = canvas.resize((size, size), Image.BOX)
    background = f"a {bg_name} background" if texture == "plain" else f"a {texture} {bg_name} background"
    return f"{' and '.join(phrases)} on {background}", image


# Grey fields. Correlation lengths are in pixels of a 64 px image (scaled with size).
GRAINS = {"fine-grained": (0.6, 1.2), "grainy": (1.2, 2.5), "mottled": (2.5, 4.5), "cloudy": (4.5, 7.0)}
AMPLITUDES = ("gaussian", "uniform", "exponential", "lognormal")
OVERLAYS = ("blob", "band", "line", "shape")
LOGNORMAL_SIGMA = 0.8


def _unit_field(rng: np.random.Generator, size: int, corr_px: float, amplitude: str) -> np.ndarray:
    """(size, size) float32, mean 0, std 1: white noise low-passed by a Gaussian of
    sigma = corr_px, then mapped pointwise to the named amplitude distribution.

    Not `anatomy.smooth_noise` (white noise on a coarse grid, interpolated up):
    that one cannot make correlation lengths below a pixel or two, and this
    domain keeps out of the phantom's modules."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), corr_px * size / 64, mode="wrap")
    n = (n - n.mean()) / (n.std() + 1e-12)
    if amplitude == "uniform":
        return ((special.ndtr(n) - 0.5) * np.sqrt(12)).astype(np.float32)
    if amplitude == "exponential":                      # -ln(1 - U) - 1: mean 0, var 1, bright tail
        return (-np.log1p(-special.ndtr(n) * (1 - 1e-7)) - 1).astype(np.float32)
    if amplitude == "lognormal":
        s = LOGNORMAL_SIGMA
        return ((np.exp(s * n - s * s / 2) - 1) / np.sqrt(np.expm1(s * s))).astype(np.float32)
    return n.astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A random grain word and a multiplicative texture 1 + a m (a: contrast 0.15-0.7)."""
    grain = list(GRAINS)[rng.integers(len(GRAINS))]
    m = _unit_field(rng, size, rng.uniform(*GRAINS[grain]), AMPLITUDES[rng.integers(len(AMPLITUDES))])
    return grain, 1.0 + rng.uniform(0.15, 0.7) * m


def _grey_word(level: float) -> str:
    return "black" if level < 35 else "dark" if level < 90 else "gray" if level < 160 else \
        "light" if level < 220 else "white"


def _soft_mask(size: int, draw_fn, blur_px: float) -> np.ndarray:
    """(size, size) coverage in [0, 1] of what draw_fn paints at 2x, optionally blurred."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw_fn(ImageDraw.Draw(big), size * SUPERSAMPLE)
    m = np.asarray(big.resize((size, size), Image.BOX), np.float32) / 255
    return ndimage.gaussian_filter(m, blur_px) if blur_px > 0 else m


def _overlay(rng: np.random.Generator, kind: str, size: int) -> tuple[str, np.ndarray]:
    """An overlay's caption phrase and coverage mask."""
    blur = float(rng.choice([0.0, 0.6, 1.5]))
    if kind in ("blob", "shape"):
        shape = "blob" if kind == "blob" else SHAPES[rng.integers(len(SHAPES) - 1)]   # SHAPES ends with blob
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        frac = rng.uniform(*SIZES[size_name])

        def draw(d, big):
            r = frac * big / 2
            _draw_shape(d, shape, rng.uniform(r, big - r), rng.uniform(r, big - r), r, 255, rng)
        return f"a {size_name} {{grey}} {shape}", _soft_mask(size, draw, blur)
    if kind == "band":
        width = rng.uniform(0.03, 0.15)
        name = "thin" if width < 0.07 else "wide"
        y0, amp, freq, ph = rng.uniform(0.15, 0.85), rng.uniform(0, 0.08), rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi)

        def draw(d, big):
            xs = np.linspace(0, big, 33)
            top = [(x, big * (y0 + amp * np.sin(2 * np.pi * freq * x / big + ph))) for x in xs]
            d.polygon(top + [(x, y + width * big) for x, y in reversed(top)], fill=255)
        return f"a {name} wavy {{grey}} band", _soft_mask(size, draw, blur)
    width = int(rng.integers(1, 4)) * SUPERSAMPLE
    p, q = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    return (f"a {'thin' if width <= SUPERSAMPLE else 'thick'} {{grey}} line",
            _soft_mask(size, lambda d, big: d.line([tuple(p * big), tuple(q * big)], fill=255, width=width), blur))


def _field_scene(rng: np.random.Generator, size: int) -> tuple[str, Image.Image]:
    """A grey textured field, maybe under a gradient, with 0-2 textured overlays."""
    level = rng.uniform(25, 210)
    grain, texture = _texture(rng, size)
    grey = level * texture
    phrases = []
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        a = rng.uniform(0, 2 * np.pi)
        grey = grey * (1 + rng.uniform(0.4, 1.2) * ((xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a)))
        phrases.append("a gradient")
    for _ in range(int(rng.choice(3, p=[0.25, 0.5, 0.25]))):
        phrase, m = _overlay(rng, OVERLAYS[rng.integers(len(OVERLAYS))], size)
        inner = rng.uniform(0, 255)
        grey = (1 - m) * grey + m * inner * _texture(rng, size)[1]
        phrases.append(phrase.format(grey=_grey_word(inner)))
    caption = f"a {grain} {_grey_word(level)} field"
    if phrases:                                  # "with A", "with A and B", "with A, B and C"
        caption += " with " + " and ".join(filter(None, [", ".join(phrases[:-1]), phrases[-1]]))
    g = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return caption, Image.fromarray(np.stack([g] * 3, -1))


def caption_and_image(seed: int, index: int, size: int = 64,
                      field_fraction: float = 0.0) -> tuple[str, Image.Image]:
    """Sample `index` of the domain: (caption, RGB image of size x size), a grey field with
    probability `field_fraction`, else shapes. At 0 no draw decides it, so the samples are
    those of the shapes-only domain the shipped tiny base was trained on."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if field_fraction > 0 and rng.random() < field_fraction:
        return _field_scene(rng, size)
    return _shapes_scene(rng, size)


def batch(seed: int, start: int, n: int, size: int = 64,
          field_fraction: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Samples start .. start+n-1: captions and images (n, size, size, 3) uint8."""
    pairs = [caption_and_image(seed, k, size, field_fraction) for k in range(start, start + n)]
    return [c for c, _ in pairs], np.stack([np.asarray(im) for _, im in pairs])
