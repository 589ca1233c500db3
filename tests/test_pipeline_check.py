"""The demo check's reference set (meddap.pipeline.run.write_reconstructions): real images
through the base's autoencoder, D(mean of q(z | x)), written with their provenance."""
import json

import numpy as np
import torch
from PIL import Image

from meddap.data.datasets import scan_folder
from meddap.io import sha256_file
from meddap.models.stable_diffusion import load_stable_diffusion
from meddap.pipeline.config import REPO_ROOT
from meddap.pipeline.run import write_reconstructions
from meddap.sampling.text_to_image import read_png_metadata

TINY = REPO_ROOT / "weights" / "tiny" / "tiny-sd.safetensors"


class _IdentityVAE(torch.nn.Module):
    """E(x) = (x, 0), D(z) = z, latent scale 1: an autoencoder that loses nothing."""
    scale = 1.0

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return z


class _IdentitySD:
    vae, device, dtype = _IdentityVAE(), torch.device("cpu"), torch.float32


def _image_folder(root, sizes):
    rng = np.random.default_rng(0)
    for i, (cls, (w, h)) in enumerate(sizes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{cls} ({i}).png")
    return scan_folder(root)


def test_a_lossless_autoencoder_gives_back_the_resized_center_crop(tmp_path):
    """Closed form: with E = D = identity the set is the input, resized to cover 32 x 32
    (bilinear) and center-cropped, to the byte; square inputs of that size come back as they are."""
    import torchvision.transforms.functional as TF

    images = _image_folder(tmp_path / "real", [("benign", (32, 32)), ("normal", (48, 32)), ("normal", (40, 64))])
    out = tmp_path / "rec"
    write_reconstructions(_IdentitySD(), images, out, 32, 32, quiet=True)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == [f"{it.label}/{it.path.stem}.png" for it in images.items]
    for item, line in zip(images.items, lines):
        got = np.asarray(Image.open(out / line["file"]))
        src = Image.open(item.path)
        want = np.asarray(TF.center_crop(TF.resize(src, 32, interpolation=TF.InterpolationMode.BILINEAR), [32, 32]))
        assert got.shape == (32, 32, 3) and np.array_equal(got, want), item.path
        if src.size == (32, 32):
            assert np.array_equal(got, np.asarray(src))
        assert line["source_sha256"] == sha256_file(item.path) and line["source"] == item.path.name
        assert line["sha256"] == sha256_file(out / line["file"]) and line["class"] == item.label
        assert read_png_metadata(out / line["file"])["source_sha256"] == line["source_sha256"]


def test_the_tiny_base_reconstruction_is_decode_of_the_posterior_mean(tmp_path):
    """On the shipped base: each file is round(255 (D(mean) + 1) / 2) of its image, and a
    second run writes the same bytes (one image at a time: no batch-size dependence)."""
    images = _image_folder(tmp_path / "real", [("benign", (64, 64)), ("malignant", (64, 64))])
    sd = load_stable_diffusion(TINY)
    write_reconstructions(sd, images, tmp_path / "a", 64, 64, quiet=True)
    write_reconstructions(sd, images, tmp_path / "b", 64, 64, quiet=True)
    for item in images.items:
        name = f"{item.label}/{item.path.stem}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        x = (torch.from_numpy(np.asarray(Image.open(item.path)).copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            y = sd.vae.decode(sd.vae.encode(x)[0])
        want = ((y + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        got = np.asarray(Image.open(tmp_path / "a" / name))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, item.path    # float order only
        assert not np.array_equal(got, np.asarray(Image.open(item.path)))          # a lossy decoder
