"""Shared helpers of the FID tests (no tests here): random Inception weights
that keep activations O(1), small image folders, and pytorch-fid built on the
same random weights without any download."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """He-normal convolutions/linears, batch-norm statistics near identity."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif v.ndim >= 2:
            out[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith(("running_var", "bn.weight")):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the keys of pytorch-fid's FID Inception (built by our class)."""
    from meddap.fid.inception import InceptionGraph, InceptionV3
    return randomize(InceptionV3(InceptionGraph.FID_TF2015).state_dict(), seed)


@contextlib.contextmanager
def pytorch_fid_on(state: dict[str, torch.Tensor]):
    """Within the block, pytorch-fid's fid_inception_v3() loads `state` instead of downloading."""
    import pytorch_fid.inception as pfi
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
        yield pfi


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int, mode: str = "RGB",
                 lo: int = 0, hi: int = 256) -> list[Path]:
    """Random images of the given (height, width) sizes as PNG files 000.png, 001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        shape = (h, w) if mode == "L" else (h, w, 3)
        arr = rng.integers(lo, hi, shape, dtype=np.uint8)
        path = folder / f"{i:03d}.png"
        Image.fromarray(arr, mode=None).convert(mode).save(path)
        paths.append(path)
    return paths
