"""Grad-CAM heat maps of the three classifiers (MEDDAP Fig. 2).

Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391), Eq. 1 and 2: with A^k
(h, w) the k-th feature map of the last convolutional stage and y^c the
pre-softmax score of class c,

    α_k^c = (1 / hw) Σ_ij ∂y^c / ∂A^k_ij                     (Eq. 1)
    L^c   = ReLU(Σ_k α_k^c A^k)                               (Eq. 2)

L^c (h, w) is upsampled bilinearly to the input's (H, W) and divided by its
maximum, so maps lie in [0, 1] (an all-zero map stays zero).

The feature maps are caught by a forward hook on the last convolutional
stage (the network's `gradcam_layer` in networks.ARCHITECTURES, where A's
shape is listed), their gradient by a tensor hook registered in that forward
hook.

Patch for DenseNet: torchvision's DenseNet.forward runs
`F.relu(features, inplace=True)` on the output of `features`, which would
overwrite the activations we keep (and the tensor the gradient hook sits on).
The forward hook therefore hands the network a clone; the in-place ReLU hits
the clone and our A stays the untouched norm5 output. The same clone is
harmless for the other two networks.
"""
from __future__ import annotations

from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

OVERLAY_ALPHA = 0.45   # weight of the heat map in the blend with the image


class CamTarget(Enum):
    """Which class c the map explains."""
    PREDICTED = "predicted"
    TRUE = "true"


class GradCAM:
    """`cams, logits = GradCAM(model, arch.spec.gradcam_layer)(x, classes)`;
    x (B, 3, H, W) normalised input, classes (B,) int64 or None for the
    predicted class; cams (B, H, W) float32 in [0, 1]. `layer` is the path of
    the module whose output is A. The model must be in eval mode."""

    def __init__(self, model: nn.Module, layer: str):
        self.model = model
        self.layer_name = layer
        self.activations: torch.Tensor | None = None    # (B, K, h, w)
        self.gradients: torch.Tensor | None = None      # (B, K, h, w)
        self._handle = model.get_submodule(self.layer_name).register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        self.activations = output
        if output.requires_grad:                     # not under torch.no_grad()
            output.register_hook(self._save_gradient)
        return output.clone()      # Patch: the network's in-place ReLU gets the clone (see above)

    def _save_gradient(self, grad: torch.Tensor) -> None:
        self.gradients = grad

    def remove(self) -> None:
        self._handle.remove()

    def __call__(self, x: torch.Tensor, classes: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)           # gradients flow even if weights are frozen
        with torch.enable_grad():
            logits = self.model(x)                                              # (B, C)
            if classes is None:
                classes = logits.argmax(1)
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()  # Σ_b y^{c_b}
            # Images are independent in eval mode, so one backward of the sum
            # gives each image's ∂y^c/∂A; autograd.grad leaves .grad untouched.
            torch.autograd.grad(score, x)
        a, g = self.activations.detach(), self.gradients.detach()              # (B, K, h, w)
        alpha = g.mean(dim=(2, 3), keepdim=True)                                # (B, K, 1, 1) Eq. 1
        cam = F.relu((alpha * a).sum(dim=1, keepdim=True))                      # (B, 1, h, w) Eq. 2
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B,1,H,W)
        cam = cam[:, 0]                                                         # (B, H, W)
        peak = cam.flatten(1).amax(1).clamp_min(torch.finfo(cam.dtype).tiny)    # (B,)
        return (cam / peak[:, None, None]).float(), logits.detach()


def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue -> cyan -> yellow -> red) of values in [0, 1]:
    (...,) -> (..., 3) uint8; each channel is a clipped tent 1.5 - |4v - c|,
    c = 3 (red), 2 (green), 1 (blue)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]    # (..., 1)
    centres = np.array([3.0, 2.0, 1.0])                                         # r, g, b
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)                    # (..., 3)
    return (255.0 * rgb + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend image (H, W, 3) uint8 with jet(cam) (H, W) -> (H, W, 3) uint8."""
    heat = jet(cam).astype(np.float64)
    return ((1 - alpha) * image.astype(np.float64) + alpha * heat + 0.5).astype(np.uint8)


def panel(image: np.ndarray, maps: list[tuple[str, np.ndarray]]) -> Image.Image:
    """One row like MEDDAP Fig. 2: the image, then one overlay per network,
    each captioned. image (H, W, 3) uint8; maps: (caption, cam (H, W))."""
    h, w = image.shape[:2]
    caption_h = 26                                   # two lines of PIL's default font
    tiles = [("input", image)] + [(name, overlay(image, cam)) for name, cam in maps]
    out = Image.new("RGB", (w * len(tiles), h + caption_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, (name, tile) in enumerate(tiles):
        out.paste(Image.fromarray(tile), (i * w, caption_h))
        draw.multiline_text((i * w + 2, 1), name, fill=(0, 0, 0), spacing=2)
    return out


def write_gradcam_panels(models: list[str], images: str, out, target: str = "predicted",
                         limit: int | None = None, device: str | None = None) -> int:
    """For each image of `images` (folder or SPLIT.json:FOLD:PART) write
    out/<class>_<stem>.png: the image and one Grad-CAM overlay per model, each
    captioned with the network and its predicted class. `device` follows
    meddap.device's rule (None: this process's GPU if any, else cpu). Returns the count."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo

    from meddap.classify.evaluate import load_classifier
    from meddap.classify.networks import parse_arch
    from meddap.classify.train import normalise, to_tensor_set
    from meddap.data.datasets import ImageSet, resolve_images
    from meddap.device import resolve_device
    from meddap.errors import MeddapError
    from meddap.io import atomic_path
    from meddap.progress import Progress

    mode = CamTarget(target)
    device = resolve_device(device)
    image_set = resolve_images(images)
    items = image_set.items[:limit] if limit is not None else image_set.items
    image_set = ImageSet(image_set.root, image_set.classes, items)
    loaded = [load_classifier(m, device) for m in models]
    display = int(loaded[0][1]["size"])
    shown = to_tensor_set([image_set], image_set.classes, display)
    cams: list[list[tuple[str, np.ndarray]]] = [[] for _ in items]
    bar = Progress(total=len(loaded) * len(items), desc="gradcam")     # one unit per (model, image)
    for net, meta in loaded:
        classes = list(meta["classes"])
        if mode is CamTarget.TRUE and any(it.label not in classes for it in items):
            raise MeddapError(f"--target true needs every image class in the model's classes "
                              f"{classes}; {images} has {image_set.classes}.")
        cam_engine = GradCAM(net, parse_arch(meta["arch"]).spec.gradcam_layer)
        data = to_tensor_set([image_set], image_set.classes, int(meta["size"]))
        for i, it in enumerate(items):
            x = normalise(data.images[i:i + 1].to(device))                      # (1, 3, S, S)
            c = torch.tensor([classes.index(it.label)]) if mode is CamTarget.TRUE else None
            cam, logits = cam_engine(x, c)                                      # (1, S, S)
            cam = F.interpolate(cam[:, None], size=(display, display), mode="bilinear",
                                align_corners=False)[0, 0]                     # (D, D)
            caption = f"{meta['arch']}\n-> {classes[int(logits.argmax(1))]}"
            cams[i].append((caption, cam.cpu().numpy()))
            bar.update(1, postfix=meta["arch"])
        cam_engine.remove()
    bar.close()
    out = Path(out)
    for i, it in enumerate(items):
        picture = shown.images[i].permute(1, 2, 0).numpy()                     # (3,D,D)->(D,D,3)
        info = PngInfo()
        info.add_text("meddap", f"Grad-CAM ({mode.value} class) of {', '.join(map(str, models))}")
        info.add_text("source", str(it.path))
        with atomic_path(out / f"{it.label}_{it.path.stem}.png") as tmp:
            panel(picture, cams[i]).save(tmp, format="PNG", pnginfo=info)
    return len(items)
