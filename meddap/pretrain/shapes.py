"""A procedurally generated, captioned image domain for pretraining the `tiny` base.

It stands in for the natural images (LAION) that SD v1.4 was pretrained on:
coloured geometric shapes on textured backgrounds, each image with a caption
naming what it shows, e.g. "a small red ellipse on a striped blue background".
It deliberately holds no ultrasound: no speckle model, no tissue layers, no
lesions and none of the words of the MEDDAP prompts ("ultrasound", "tumor",
"breast", "benign", "malignant"), so USLoRA really has to adapt the base to a
new domain.

Each sample is a pure function of (seed, index): `caption_and_image(seed, k)`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

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


def caption_and_image(seed: int, index: int, size: int = 64) -> tuple[str, Image.Image]:
    """Sample `index` of the domain: (caption, RGB image of size x size).

    One or two shapes; the caption names each shape's size, colour and kind, and
    the background's texture and colour.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
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


def batch(seed: int, start: int, n: int, size: int = 64) -> tuple[list[str], np.ndarray]:
    """Samples start .. start+n-1: captions and images (n, size, size, 3) uint8."""
    pairs = [caption_and_image(seed, k, size) for k in range(start, start + n)]
    return [c for c, _ in pairs], np.stack([np.asarray(im) for _, im in pairs])
