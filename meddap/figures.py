"""Every picture meddap draws, with PIL (matplotlib is not a dependency):
sample grids, the USLoRA loss curve and the bar charts of the classifier
tables. Each drawing writes one PNG atomically (`save_png`). Grad-CAM's
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
