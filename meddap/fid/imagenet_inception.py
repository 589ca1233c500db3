"""ImageNet Inception v3 average-pool features: the network of the authors' FID.

The MEDDAP authors' `fid_calc.py` uses Keras'
`InceptionV3(include_top=False, pooling='avg', input_shape=(299, 299, 3))`:
the ImageNet classifier's 2048-d global average pool, on inputs already
scaled to [-1, 1] by `preprocess_input`. Keras' weights are not available to a
PyTorch project, so we load torchvision's ImageNet Inception v3
(`Inception_V3_Weights.IMAGENET1K_V1`, "ported from the original paper" i.e.
from TensorFlow) into our Keras-shaped graph (inception.InceptionGraph.IMAGENET_KERAS).

Deviation: torchvision's weights stand in for Keras' (both are TF ports of
Google's ImageNet Inception v3, but not necessarily the same checkpoint).
The graph follows Keras, not torchvision: its average pools ignore padded
zeros. With torchvision's weights loaded, the network expects inputs in
[-1, 1], like Keras (torchvision's own `transform_input` maps ImageNet-normalised
inputs back to that range; we feed [-1, 1] directly, as Keras does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from meddap.fid.inception import InceptionGraph, InceptionV3, load_into, read_weights, tf32_off
from meddap.io import sha256_file

# torchvision.models.Inception_V3_Weights.IMAGENET1K_V1 (torchvision 0.29);
# the file name carries the first 8 hex digits of its SHA-256.
IMAGENET_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/" + IMAGENET_WEIGHTS_FILE
IMAGENET_WEIGHTS_SHA256_PREFIX = "0cc3c7bd"
DEFAULT_IMAGENET_WEIGHTS = Path("weights") / IMAGENET_WEIGHTS_FILE

# torchvision stores its auxiliary classifier (a training-time head on Mixed_6e)
# in the file; Keras' include_top=False network has none, so these keys are
# dropped by name. Every other key loads one to one.
AUX_PREFIX = "AuxLogits."


@dataclass(frozen=True)
class ImageNetInception:
    """The loaded ImageNet network (eval mode, no gradients) and where its weights came from."""
    model: InceptionV3
    path: Path
    sha256: str

    @property
    def official(self) -> bool:
        return self.sha256.startswith(IMAGENET_WEIGHTS_SHA256_PREFIX)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def avgpool_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 299, 299) in Keras' [-1, 1] scale -> (N, 2048) float32,
        the `pooling='avg'` output of Keras' include_top=False model, in full
        float32 (inception.tf32_off)."""
        with tf32_off(), torch.inference_mode():
            return self.model(x.to(self.device, torch.float32), (2048,))[2048]


def load_imagenet_inception(path: str | Path = DEFAULT_IMAGENET_WEIGHTS,
                            device: str | torch.device = "cpu") -> ImageNetInception:
    """Build the Keras-shaped ImageNet Inception v3 and load torchvision's weights."""
    path = Path(path)
    state = read_weights(path, what="ImageNet Inception v3 (torchvision IMAGENET1K_V1)",
                         origin=IMAGENET_WEIGHTS_URL, sha256=IMAGENET_WEIGHTS_SHA256_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
    model = InceptionV3(InceptionGraph.IMAGENET_KERAS)
    load_into(model, state, path)
    return ImageNetInception(model.eval().requires_grad_(False).to(device), path, sha256_file(path))
