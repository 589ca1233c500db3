"""Inception v3 (Szegedy et al. 2016, arXiv 1512.00567) for FID, written here.

Two graphs share these blocks and differ in the branch pool of the last block
and the classifier size (InceptionGraph):

- `FID_TF2015`: the TF graph `inception-2015-12-05` that the original FID code
  (TTUR, Heusel et al. 2017, arXiv 1706.08500) and pytorch-fid use. Its
  average pools ignore the padded zeros (TF 'SAME' semantics) and its last
  block, Mixed_7c, pools by max instead of average. It has 1008 classes.
- `IMAGENET_KERAS`: Keras' `InceptionV3(include_top=False, pooling='avg')`,
  which the MEDDAP authors' `fid_calc.py` uses. Average pools ignore padded
  zeros (Keras 'same' padding on TF), Mixed_7c averages. We load torchvision's
  ImageNet weights into it (see imagenet_inception.py).

Module paths are torchvision's `Inception3` names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch_pool.bn.running_var`, ..., `fc.weight`), which are also the
keys of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: loading that file
is `load_state_dict(strict=True)`.

Feature taps (pytorch-fid's block indices 0..3), spatially averaged:
   64: after the first max pool     (N, 64, 73, 73)
  192: after the second max pool    (N, 192, 35, 35)
  768: after Mixed_6e               (N, 768, 17, 17)
 2048: after Mixed_7c               (N, 2048, 8, 8)
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from meddap.data.datasets import load_rgb
from meddap.errors import MeddapError
from meddap.fid.config import check_fid_dims
from meddap.fid.stats_cache import FeatureExtractor
from meddap.io import read_torch_state_dict, sha256_file

# pytorch-fid's port of the TF-2015 FID graph; the name carries the first 8 hex
# digits of the file's SHA-256 (torch.hub convention). Source:
# pytorch_fid/inception.py FID_WEIGHTS_URL (pytorch-fid 0.3.0).
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/" + FID_WEIGHTS_FILE)
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
DEFAULT_FID_WEIGHTS = Path("weights") / FID_WEIGHTS_FILE

INCEPTION_SIZE = 299          # input side of Inception v3 (arXiv 1512.00567, Table 1)
BN_EPS = 1e-3                 # TF's batch-norm epsilon in Inception v3 (torchvision BasicConv2d)
_TAP_OF_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}   # pytorch-fid BLOCK_INDEX_BY_DIM


class InceptionGraph(enum.Enum):
    FID_TF2015 = "fid-tf2015"
    IMAGENET_KERAS = "imagenet-keras"


def avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over in-image pixels only. x: (N, C, H, W) -> same.

    Patch: TensorFlow's average pool with 'SAME' padding divides by the number
    of real pixels under the window, not by 9 (torchvision counts the zeros).
    """
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 max pool. x: (N, C, H, W) -> same.

    Patch: the TF-2015 FID graph's last block (Mixed_7c) max-pools here where
    the Inception v3 paper and other ports average (pytorch-fid's FIDInceptionE_2).
    """
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


Pool = Callable[[torch.Tensor], torch.Tensor]


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 module: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 (arXiv 1512.00567, Fig. 5)."""

    def __init__(self, cin: int, pool_features: int, pool: Pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # (N, 768, 17, 17)


class InceptionC(nn.Module):
    """17x17 module with factorised 7x7 convolutions (arXiv 1512.00567, Fig. 6)."""

    def __init__(self, cin: int, channels_7x7: int, pool: Pool):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b7, bd, bp], 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (N, 1280, 8, 8)


class InceptionE(nn.Module):
    """8x8 module with expanded 1x3/3x1 outputs (arXiv 1512.00567, Fig. 7)."""

    def __init__(self, cin: int, pool: Pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)    # (N, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # (N, 768, 8, 8)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, bd, bp], 1)  # (N, 2048, 8, 8)


class InceptionV3(nn.Module):
    """Inception v3 trunk with torchvision's module names; `graph` picks the pools."""

    def __init__(self, graph: InceptionGraph = InceptionGraph.FID_TF2015):
        super().__init__()
        self.graph = graph
        last_pool = max_pool_same if graph is InceptionGraph.FID_TF2015 else avg_pool_valid
        # The TF-2015 graph's softmax has 1008 outputs (1000 classes + unused slots).
        num_classes = 1008 if graph is InceptionGraph.FID_TF2015 else 1000
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, avg_pool_valid)
        self.Mixed_5c = InceptionA(256, 64, avg_pool_valid)
        self.Mixed_5d = InceptionA(288, 64, avg_pool_valid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg_pool_valid)
        self.Mixed_6c = InceptionC(768, 160, avg_pool_valid)
        self.Mixed_6d = InceptionC(768, 160, avg_pool_valid)
        self.Mixed_6e = InceptionC(768, 192, avg_pool_valid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg_pool_valid)
        self.Mixed_7c = InceptionE(2048, last_pool)
        # The classifier is never run for FID; it is kept so that the released
        # weight files load key for key.
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor, dims: tuple[int, ...] = (2048,)) -> dict[int, torch.Tensor]:
        """x: (N, 3, 299, 299) already scaled to [-1, 1] -> {dim: (N, dim)}.

        Each tap is spatially averaged (pytorch-fid's adaptive_avg_pool2d to
        1x1); the network stops after the deepest requested tap.
        """
        last = max(_TAP_OF_DIM[d] for d in dims)
        taps: dict[int, torch.Tensor] = {}
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (N, 64, 73, 73)
        taps[64] = x
        if last >= 1:
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                  # (N, 192, 71, 71)
            x = F.max_pool2d(x, kernel_size=3, stride=2)                   # (N, 192, 35, 35)
            taps[192] = x
        if last >= 2:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                          self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
                x = block(x)
            taps[768] = x                                                  # (N, 768, 17, 17)
        if last >= 3:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
            taps[2048] = x                                                 # (N, 2048, 8, 8)
        return {d: F.adaptive_avg_pool2d(taps[d], (1, 1)).flatten(1) for d in dims}  # (N, d)


def check_dims(dims: int) -> int:
    complaint = check_fid_dims(dims)
    if complaint:
        raise MeddapError(f"dims = {dims} {complaint}.")
    return dims


def read_weights(path: str | Path, *, what: str, origin: str, sha256: str) -> dict[str, torch.Tensor]:
    """Read a state dict, or explain which file is missing and where it comes from.

    `sha256` is the full hex digest when known, else its published prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise MeddapError(
            f"{what} weights file {path} does not exist. Expected {path.name} with "
            f"SHA-256 {sha256}{'' if len(sha256) == 64 else '... (prefix from the file name)'}; "
            f"it is released at {origin} . meddap never downloads: fetch it yourself into "
            f"{path.parent}/ or pass --inception-weights PATH.")
    return read_torch_state_dict(path, what=f"{what} weights file")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """`load_state_dict(strict=True)` with an error that names the keys at fault."""
    own = set(model.state_dict())
    missing = sorted(own - set(state) - {k for k in own if k.endswith("num_batches_tracked")})
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise MeddapError(f"weights file {path} does not fit {type(model).__name__} "
                          f"({model.graph.value}): missing keys {missing[:3]}, "
                          f"unexpected keys {unexpected[:3]} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected).")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MeddapError(f"weights file {path} does not load into the network: {e}") from e


@dataclass(frozen=True)
class FIDInception:
    """The loaded FID network (eval mode, no gradients) and where its weights came from."""
    model: InceptionV3
    path: Path
    sha256: str

    @property
    def official(self) -> bool:
        return self.sha256 == FID_WEIGHTS_SHA256

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_fid_inception(path: str | Path = DEFAULT_FID_WEIGHTS,
                       device: str | torch.device = "cpu") -> FIDInception:
    """Build the TF-2015 FID graph and load pytorch-fid's weight file into it."""
    path = Path(path)
    state = read_weights(path, what="FID Inception (TF-2015 graph, pytorch-fid port)",
                         origin=FID_WEIGHTS_URL, sha256=FID_WEIGHTS_SHA256)
    model = InceptionV3(InceptionGraph.FID_TF2015)
    load_into(model, state, path)
    return FIDInception(model.eval().requires_grad_(False).to(device), path, sha256_file(path))


def fid_preprocess(images: torch.Tensor) -> torch.Tensor:
    """images: (N, 3, H, W) in [0, 1] -> (N, 3, 299, 299) in [-1, 1].

    pytorch-fid's InceptionV3(resize_input=True, normalize_input=True):
    bilinear resize with align_corners=False, then 2x - 1.
    """
    x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE),
                      mode="bilinear", align_corners=False)
    return 2 * x - 1


def inception_features(images: torch.Tensor, weights: str | Path | FIDInception = DEFAULT_FID_WEIGHTS,
                       dims: int = 2048, batch_size: int = 50,
                       device: str | torch.device | None = None) -> np.ndarray:
    """FID Inception features of images (N, 3, H, W) float in [0, 1] -> (N, dims) float64.

    `weights` is the path of pytorch-fid's weight file, loaded on `device`
    (default cpu), or an already loaded FIDInception, which runs where it is.
    Features are computed in float32 and returned as float64, as pytorch-fid's
    get_activations does.
    """
    check_dims(dims)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != 3 or not images.is_floating_point():
        raise MeddapError(f"images must be a float tensor (N, 3, H, W) in [0, 1] with N >= 1; "
                          f"got {images.dtype} of shape {tuple(images.shape)}.")
    if batch_size < 1:
        raise MeddapError(f"batch size {batch_size} must be at least 1.")
    if isinstance(weights, FIDInception):
        net = weights
        if device is not None and torch.device(device) != net.device:
            raise MeddapError(f"the network was loaded on {net.device}, but device {device} was asked; "
                              f"load it there with load_fid_inception(path, device).")
    else:
        net = load_fid_inception(weights, device or "cpu")
    return np.concatenate([_embed(net, images[s:s + batch_size], dims)
                           for s in range(0, images.shape[0], batch_size)])   # (N, dims)


@contextlib.contextmanager
def tf32_off():
    """Full float32 convolutions and matrix products inside the block; the
    previous settings are restored on exit.

    On NVIDIA GPUs since Ampere, PyTorch lets cuDNN convolutions round their
    float32 inputs to TF32 (10-bit mantissa) by default. FID features are
    float32 as in pytorch-fid, and the as-released inputs differ from -1 by at
    most 2/255² (meddap.fid.as_released), which TF32 rounds away. Every
    feature pass of an FID network runs inside this block. No effect on the CPU.
    """
    with tf32(False):
        yield


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuDNN convolutions and matrix products on or off inside the block (restored after)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _embed(net: FIDInception, x: torch.Tensor, dims: int) -> np.ndarray:
    """x: (B, 3, H, W) in [0, 1] -> (B, dims) float64, computed in full float32 (tf32_off)."""
    with tf32_off(), torch.inference_mode():
        x = fid_preprocess(x.to(net.device, torch.float32))
        return net.model(x, (dims,))[dims].cpu().numpy().astype(np.float64)


def load_image_01(path: Path) -> torch.Tensor:
    """An image file -> (3, 299, 299) float32 in [0, 1].

    As pytorch-fid's ImagePathDataset: PIL `.convert('RGB')` (grayscale is
    replicated) and ToTensor (/255). Each image is then resized to 299x299
    here, bilinearly (align_corners=False), so that folders of mixed sizes can
    be batched; the network's own resize is then the identity. For a folder of
    one size this is exactly what pytorch-fid computes; for mixed sizes it is
    what pytorch-fid computes with batch size 1.
    """
    x = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    x = x.to(torch.float32).div(255)
    if x.shape[1:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x[None], size=(INCEPTION_SIZE, INCEPTION_SIZE),
                          mode="bilinear", align_corners=False)[0]
    return x


def fid_extractor(net: FIDInception, dims: int = 2048) -> FeatureExtractor:
    """Standard FID features of image files (float64, like pytorch-fid)."""
    check_dims(dims)
    settings = {"network": InceptionGraph.FID_TF2015.value, "weights_sha256": net.sha256,
                "dims": dims, "input": "rgb-totensor-bilinear299-2x-1"}
    return FeatureExtractor(settings=settings, prepare=load_image_01,
                            embed=lambda batch: _embed(net, batch, dims))
