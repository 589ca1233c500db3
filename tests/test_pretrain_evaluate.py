"""The tiny base's autoencoder measured on held-out phantoms (meddap.pretrain.evaluate), and the
grey-field scenes of the shapes domain: closed forms, the fixed probe set, and the shipped file."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from meddap.data import phantom
from meddap.pretrain import shapes
from meddap.pretrain.evaluate import (PROBE_IMAGES, PROBE_SIZE, Reconstruction, block_mean_reference,
                                      channel_spread, noise_mean_error, probe_phantoms, read_images,
                                      vae_reconstruction)

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "tiny-sd.safetensors"
NOISE_MEAN_MAX = 0.7        # the shipped file: 0.51; the previous one (32 groups): 0.97
MEDDAP_WORDS = ("ultrasound", "tumor", "breast", "benign", "malignant", "lesion")


class _Identity(torch.nn.Module):
    """A stand-in autoencoder: encode = identity, decode = identity (plus an optional colour tint)."""

    def __init__(self, tint=(0.0, 0.0, 0.0), gain: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.tint, self.gain = torch.tensor(tint).view(1, 3, 1, 1), gain

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return self.gain * z + self.tint


def test_probe_set_is_fixed_grey_and_balanced():
    a, b = probe_phantoms(), probe_phantoms()
    assert a.shape == (PROBE_IMAGES, PROBE_SIZE, PROBE_SIZE) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    rng = phantom.image_rng(20_240_325, phantom.Site.A, "malignant", 1)     # probe 1 is malignant
    assert np.array_equal(a[1], phantom.simulate(rng, "malignant", phantom.PROBES[phantom.Site.A], 64)[0])


def test_psnr_and_spread_closed_forms():
    grey = np.full((4, 16, 16), 128, np.uint8)
    perfect = vae_reconstruction(_Identity(), grey)
    assert perfect.psnr_db > 80 and perfect.spread == 0.0
    # a tint of +0.2 on red only in [-1, 1] units = +0.1 in [0, 1]: MSE = 0.01 / 3, spread 0.1
    tinted = vae_reconstruction(_Identity(tint=(0.2, 0.0, 0.0)), grey)
    assert tinted.psnr_db == pytest.approx(10 * np.log10(3 / 0.01), abs=1e-3)
    assert tinted.spread == pytest.approx(0.1, abs=1e-5)


def test_channel_spread_of_files_closed_form_and_the_check_summary(tmp_path):
    """Files as every stage reads them: grey (L or RGB) is 0; a pixel (255, 0, 0) is 1 and
    (200, 150, 175) is 50/255. The demo's check summary (`check_spread`) gives all and per class."""
    from PIL import Image

    from meddap.pipeline.run import check_spread

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / "a" / "grey_L.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a" / "grey_rgb.png")
    half = np.full((32, 32, 3), 200, np.uint8)
    half[:16, :, 0] = 255
    half[:16, :, 1:] = 0                                   # top half (255, 0, 0): spread 1 there
    Image.fromarray(half).save(tmp_path / "b" / "half_red.png")
    tint = np.empty((32, 32, 3), np.uint8)
    tint[...] = (200, 150, 175)
    Image.fromarray(tint).save(tmp_path / "b" / "tint.png")
    assert channel_spread(read_images(sorted((tmp_path / "a").glob("*.png")))) == 0.0
    assert channel_spread(read_images([tmp_path / "b" / "half_red.png"])) == pytest.approx(0.5, abs=1e-12)
    assert channel_spread(read_images([tmp_path / "b" / "tint.png"])) == pytest.approx(50 / 255, abs=1e-12)
    s = check_spread(tmp_path)
    assert s == pytest.approx({"all": (0.5 + 50 / 255) / 4, "a": 0.0, "b": (0.5 + 50 / 255) / 2}, abs=1e-12)


def test_block_mean_reference_is_exact_on_block_constant_images_and_loses_on_speckle():
    rng = np.random.default_rng(0)
    flat = np.repeat(np.repeat(rng.integers(0, 256, (2, 2, 2), dtype=np.uint8), 8, 1), 8, 2)
    uniform = np.full((2, 16, 16), 77, np.uint8)
    assert block_mean_reference(uniform) > 80
    assert block_mean_reference(flat) < 80                  # bilinear upsampling smooths block edges
    speckle = probe_phantoms(n=6)
    assert 15 < block_mean_reference(speckle) < 22


def test_shipped_base_reconstructs_held_out_phantoms_grey_and_sharp_enough():
    """The demo's goal for the shipped VAE (never trained on phantoms): PSNR >= 18.5 dB and
    channel spread <= 0.03 on the 32 probe phantoms, and above the smooth block-mean
    reference of the same images (18.72 dB). Measured: 19.05 dB and 0.023
    (weights/tiny/README.md); the base before (shapes only, 900 steps): 15.5 dB and 0.205."""
    from meddap.models.stable_diffusion import load_stable_diffusion
    grey = probe_phantoms()
    r = vae_reconstruction(load_stable_diffusion(SHIPPED).vae, grey)
    assert isinstance(r, Reconstruction)
    assert r.psnr_db >= 18.5 and r.spread <= 0.03, r
    assert r.psnr_db > block_mean_reference(grey)



class _ZeroLatentSD:
    """A stand-in SD whose VAE encodes every image to z_0 = 0, so z_t = sqrt(1 - ab_t) eps and
    the exact noise is z_t / sqrt(1 - ab_t); `unet` is that exact noise, optionally with its
    per-image channel means removed (a UNet blind to them)."""

    def __init__(self, blind: bool):
        from meddap.sampling.schedule import NoiseSchedule
        self.blind, self.ab = blind, NoiseSchedule.sd_v1().alphas_cumprod
        self.vae = torch.nn.Module()
        self.vae.w = torch.nn.Parameter(torch.zeros(()))
        self.vae.scale = 0.18215
        self.vae.encode = lambda x: (torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8),) * 2
        self.text_encoder = lambda tokens: torch.zeros(tokens.shape[0], 77, 8)
        self.text_encoder.tokenize = lambda texts: torch.zeros(len(texts), 77, dtype=torch.long)
        self.unet = _CallableModule(self._unet)

    def _unet(self, z_t, t, context):
        eps = z_t / (1 - self.ab[t]).sqrt().view(-1, 1, 1, 1)
        return eps - eps.mean((2, 3), keepdim=True) if self.blind else eps


class _CallableModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, torch.nn.Parameter(torch.zeros(()))

    def forward(self, *args):
        return self.fn(*args)


def test_noise_mean_error_is_0_for_the_exact_noise_and_1_for_a_mean_blind_unet():
    grey = np.full((6, 64, 64), 90, np.uint8)
    assert noise_mean_error(_ZeroLatentSD(blind=False), grey) < 1e-5
    assert noise_mean_error(_ZeroLatentSD(blind=True), grey) == pytest.approx(1.0, abs=1e-6)


def test_shipped_unet_tracks_the_per_image_mean_of_the_noise():
    """The shipped UNet (8 GroupNorm groups, meddap/models/config.py) on the probe phantoms'
    latents: noise-mean error NOISE_MEAN_MAX or less. A UNet with 32 groups on its 32
    channels could not see that mean: the previous file measured 0.97 (its error was the
    mean itself), and its samples had a random colour cast per image; this one 0.51."""
    from meddap.models.stable_diffusion import load_stable_diffusion
    e = noise_mean_error(load_stable_diffusion(SHIPPED), probe_phantoms())
    assert e <= NOISE_MEAN_MAX, e

def test_grey_field_scenes_are_grey_captioned_and_not_ultrasound():
    caps, images = shapes.batch(2, 0, 80, 64, field_fraction=1.0)
    assert caps == shapes.batch(2, 0, 80, 64, field_fraction=1.0)[0]
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    words = "|".join(shapes.GRAINS)
    for c in caps:
        assert re.fullmatch(rf"a ({words}) (black|dark|gray|light|white) field( with .+)?", c), c
        assert not any(w in c for w in MEDDAP_WORDS)
    assert images.std() > 20                                 # textured, not flat
    mixed, _ = shapes.batch(2, 0, 200, 64, field_fraction=0.5)
    share = sum(" field" in c for c in mixed) / len(mixed)
    assert 0.35 < share < 0.65


@pytest.mark.parametrize("amplitude", shapes.AMPLITUDES)
def test_unit_fields_have_zero_mean_unit_variance_and_their_distribution(amplitude):
    rng = np.random.default_rng(1)
    m = np.stack([shapes._unit_field(rng, 64, 1.5, amplitude) for _ in range(20)])
    assert abs(m.mean()) < 0.06 and abs(m.std() - 1) < 0.08
    skew = ((m - m.mean()) ** 3).mean() / m.std() ** 3
    expected = {"gaussian": 0.0, "uniform": 0.0, "exponential": 2.0,
                "lognormal": (np.exp(0.64) + 2) * np.sqrt(np.expm1(0.64))}[amplitude]
    assert abs(skew - expected) < 0.35 + 0.25 * expected, (amplitude, skew)
