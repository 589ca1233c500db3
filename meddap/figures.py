"""Every picture meddap draws, with PIL (matplotlib is not a dependency):
sample grids, the USLoRA loss curve, the bar charts of the classifier
tables and their reliability diagrams. Each drawing writes one PNG atomically (`save_png`). Grad-CAM's
panels are drawn in meddap/classify/gradcam.py, beside the colour map they use.
"""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

from meddap.io import atomic_path

GRID_COLUMNS = 6
THUMB = 64


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# ---------------------------------------------------------------- images and the loss curve

def sample_grid(rows: list[tuple[str, list[Path]]], path: Path, columns: int = GRID_COLUMNS) -> Path:
    """One labelled row of `columns` thumbnails per (label, images)."""
    label_w = 120
    grid = Image.new("RGB", (label_w + columns * THUMB, len(rows) * THUMB), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * THUMB + THUMB // 2 - 6), label, fill="black")
        for c, p in enumerate(images[:columns]):
            grid.paste(Image.open(p).convert("RGB").resize((THUMB, THUMB)), (label_w + c * THUMB, r * THUMB))
    save_png(grid, path)
    return path


def stack_pictures(paths: list[Path], path: Path) -> Path:
    """The pictures one above the other (the demo's overview: real, adapted, unadapted)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + 4 * len(images)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + 4
    save_png(canvas, path)
    return path


def loss_curve(csv_path: Path, path: Path, size: tuple[int, int] = (480, 240), smooth: int = 20) -> Path:
    """The USLoRA training loss per step (grey) and its running mean over `smooth` steps (blue)."""
    with open(csv_path, encoding="utf-8") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    W, H = size
    pad = 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        return (pad + (W - 2 * pad) * i / max(len(losses) - 1, 1), H - pad - (H - 2 * pad) * (v - lo) / (hi - lo))

    draw.line([(pad, pad), (pad, H - pad), (W - pad, H - pad)], fill="black")
    draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190))
    means = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
             for i in range(len(losses))]
    draw.line([xy(i, v) for i, v in enumerate(means)], fill=(31, 119, 180), width=2)
    draw.text((pad, 8), f"USLoRA loss (MEDDAP Eq. 1), {len(losses)} steps; mean of {smooth} in blue", fill="black")
    draw.text((4, pad - 6), f"{hi:.3f}", fill="black")
    draw.text((4, H - pad - 6), f"{lo:.3f}", fill="black")
    draw.text((W - pad - 30, H - pad + 6), f"step {len(losses)}", fill="black")
    save_png(img, path)
    return path


def pair_grid(pairs: list[tuple[Path, Path, str]], path: Path, columns: int = 8) -> Path:
    """One cell per (top, bottom, caption): `top` above `bottom`, the caption under
    them; `columns` cells a row (meddap memorization: a synthetic image above its
    nearest training image, captioned with their distance)."""
    caption_h = 14
    cell_h = 2 * THUMB + caption_h
    rows = max(1, -(-len(pairs) // columns))                         # ceil(len / columns)
    grid = Image.new("RGB", (columns * (THUMB + 4), rows * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for n, (top, bottom, caption) in enumerate(pairs):
        x, y = (n % columns) * (THUMB + 4), (n // columns) * (cell_h + 4)
        grid.paste(Image.open(top).convert("RGB").resize((THUMB, THUMB)), (x, y))
        grid.paste(Image.open(bottom).convert("RGB").resize((THUMB, THUMB)), (x, y + THUMB))
        draw.text((x + 2, y + 2 * THUMB + 1), caption, fill="black")
    save_png(grid, path)
    return path


# ---------------------------------------------------------------- bar charts (classifier tables)

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def bar_chart(path: Path, title: str, groups: list[str], series: list[str],
              values: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Grouped bars of values in [0, 1] shown as %, with ± std whiskers;
    drawn with PIL (matplotlib is not a dependency). Group labels are written
    vertically under the axis."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda text: int(measure.textlength(text)) + 4  # noqa: E731
    bar_w, gap, left, top, plot_h, legend_w = 14, 12, 50, 50, 300, 20 + max(map(text_w, series))
    label_h = max(map(text_w, groups)) + 4
    plot_w = len(groups) * (len(series) * bar_w + gap)
    width = max(left + plot_w + 20 + legend_w, left + text_w(title) + 10)
    img = Image.new("RGB", (width, top + plot_h + label_h + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill="black")
    y_of = lambda v: top + plot_h * (1.0 - min(max(v, 0.0), 1.0))  # noqa: E731
    for tick in range(0, 101, 20):
        y = y_of(tick / 100)
        d.line([(left - 4, y), (left + plot_w, y)], fill=(220, 220, 220))
        d.text((left - 30, y - 5), f"{tick}", fill="black")
    x = left + gap // 2
    for g in groups:
        for i, s in enumerate(series):
            mean, std = values.get((g, s), (float("nan"), float("nan")))
            if mean == mean:
                d.rectangle([x, y_of(mean), x + bar_w - 2, y_of(0)], fill=_PALETTE[i % len(_PALETTE)])
                if std == std:
                    cx = x + bar_w // 2 - 1
                    d.line([(cx, y_of(mean - std)), (cx, y_of(mean + std))], fill="black")
            x += bar_w
        label = Image.new("RGB", (label_h, 14), "white")
        ImageDraw.Draw(label).text((2, 1), g, fill="black")
        img.paste(label.rotate(90, expand=True), (x - len(series) * bar_w // 2 - 7, top + plot_h + 6))
        x += gap
    d.line([(left, y_of(0)), (left + plot_w, y_of(0))], fill="black")
    for i, s in enumerate(series):
        x, y = left + plot_w + 20, top + 16 * i
        d.rectangle([x, y, x + 10, y + 10], fill=_PALETTE[i % len(_PALETTE)])
        d.text((x + 15, y - 1), s, fill="black")
    save_png(img, path)


# ---------------------------------------------------------------- reliability diagrams (calibration)

def reliability_diagram(path: Path, title: str, curves: dict[str, dict[str, list]],
                        size: int = 300) -> Path:
    """Accuracy against confidence per confidence bin (Guo et al. 2017, arXiv
    1706.04599, Fig. 1), one coloured line per curve, with the diagonal of a
    calibrated classifier. A curve is metrics.reliability_bins' sums
    {count, correct, confidence} (M bins each); a point is (sum confidence /
    count, sum correct / count) of a non-empty bin, drawn with a dot whose
    area grows with the bin's share of the images."""
    left, top, legend_h = 50, 30, 16 * len(curves) + 8
    img = Image.new("RGB", (left + size + 20, top + size + 30 + legend_h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    xy = lambda conf, acc: (left + size * conf, top + size * (1.0 - acc))  # noqa: E731
    for tick in range(0, 101, 20):
        x, y = xy(tick / 100, tick / 100)
        d.line([(left, y), (left + size, y)], fill=(230, 230, 230))
        d.text((left - 30, y - 5), f"{tick}", fill="black")
        d.text((x - 6, top + size + 4), f"{tick}", fill="black")
    d.rectangle([left, top, left + size, top + size], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(150, 150, 150))
    d.text((left + size - 150, top + size + 16), "confidence % (x), accuracy % (y)", fill="black")
    for i, (name, bins) in enumerate(curves.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        n = max(sum(bins["count"]), 1)
        points = [(xy(conf / cnt, ok / cnt), cnt / n) for cnt, ok, conf
                  in zip(bins["count"], bins["correct"], bins["confidence"]) if cnt > 0]
        if len(points) > 1:
            d.line([p for p, _ in points], fill=colour, width=2)
        for (x, y), share in points:
            r = 2 + 6 * share ** 0.5
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        y = top + size + 32 + 16 * i
        d.rectangle([left, y, left + 10, y + 10], fill=colour)
        d.text((left + 15, y - 1), name, fill="black")
    save_png(img, path)
    return path
