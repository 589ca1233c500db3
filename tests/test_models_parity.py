"""Parity with diffusers on the same random weights: relative error <= 1e-4 in float32.

The diffusers models are built from OUR state dicts by diffusers' own
single-file conversion (tests/oracles.py), so these tests check both the
math and that our names mean what the CompVis names mean.

Sizes: the `tiny` config at 512 px (64x64 latents) and 224 px (28x28
latents, the paper's training resolution, where the UNet's down path rounds
7 -> 4), plus an odd size; the FULL SD v1.4 UNet at 224 px and the full VAE
at 64 px (about 3.5 GB and 0.4 GB in float32; diffusers shares our tensors,
so there is no second copy).
"""
import pytest
import torch

from meddap.models.config import SD_V1_4, TINY
from meddap.models.unet import UNetModel
from meddap.models.vae import AutoencoderKL
from oracles import diffusers_unet_from_ours, diffusers_vae_from_ours, perturb_vectors_, relative_error

TOLERANCE = 1e-4  # the port's acceptance bound: relative error in float32


def _pair(build, oracle, cfg, seed):
    torch.manual_seed(seed)
    ours = perturb_vectors_(build(cfg).eval(), torch.Generator().manual_seed(seed + 1))
    return ours, oracle(ours.state_dict(), cfg, share=True)


def _unet_parity(ours, theirs, batch, h, w, context_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([999, 1, 500, 37][:batch])
    context = torch.randn(batch, 77, context_dim, generator=g)
    with torch.no_grad():
        eps = ours(x, t, context)
        expected = theirs(x, t, encoder_hidden_states=context).sample
    assert eps.shape == expected.shape == x.shape
    return relative_error(eps, expected)


def _vae_parity(ours, theirs, batch, h, w, seed=0):
    x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        posterior = theirs.encode(x).latent_dist
        decoded = ours.decode(mean)
        expected = theirs.decode(mean).sample
    assert mean.shape == (batch, 4, h // 8, w // 8) and decoded.shape == x.shape
    return (relative_error(mean, posterior.mean), relative_error(logvar, posterior.logvar),
            relative_error(decoded, expected))


@pytest.fixture(scope="module")
def tiny_unets():
    return _pair(UNetModel, diffusers_unet_from_ours, TINY.unet, seed=0)


@pytest.fixture(scope="module")
def tiny_vaes():
    return _pair(AutoencoderKL, diffusers_vae_from_ours, TINY.vae, seed=0)


@pytest.mark.parametrize("h, w", [(64, 64), (28, 28), (30, 22)], ids=["512px", "224px", "240x176px"])
def test_tiny_unet_matches_diffusers(tiny_unets, h, w):
    assert _unet_parity(*tiny_unets, 1, h, w, TINY.unet.context_dim) <= TOLERANCE


@pytest.mark.parametrize("h, w", [(512, 512), (224, 224)], ids=["512px", "224px"])
def test_tiny_vae_matches_diffusers(tiny_vaes, h, w):
    assert max(_vae_parity(*tiny_vaes, 1, h, w)) <= TOLERANCE


def test_tiny_vae_logvar_clamp_matches_diffusers(tiny_vaes):
    ours, theirs = tiny_vaes
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        bias = ours.quant_conv.bias.clone()
        ours.quant_conv.bias[4:].copy_(torch.tensor([80.0, -80.0, 0.0, 0.0]))  # shared tensor: both see it
        try:
            _, logvar = ours.encode(x)
            expected = theirs.encode(x).latent_dist.logvar
        finally:
            ours.quant_conv.bias.copy_(bias)
    assert torch.all(logvar[:, 0] == 20.0) and torch.all(logvar[:, 1] == -30.0)
    assert torch.equal(logvar[:, :2], expected[:, :2])
    assert relative_error(logvar, expected) <= TOLERANCE


def test_full_size_unet_matches_diffusers_at_224px():
    # The real SD v1.4 network (859,520,964 parameters), 28x28 latents. Built
    # in the test so its 3.5 GB are freed when the test returns.
    ours, theirs = _pair(UNetModel, diffusers_unet_from_ours, SD_V1_4.unet, seed=10)
    assert _unet_parity(ours, theirs, 1, 28, 28, SD_V1_4.unet.context_dim) <= TOLERANCE


def test_full_size_vae_matches_diffusers_at_64px():
    ours, theirs = _pair(AutoencoderKL, diffusers_vae_from_ours, SD_V1_4.vae, seed=10)
    assert max(_vae_parity(ours, theirs, 1, 64, 64)) <= TOLERANCE
