"""KL autoencoder: checkpoint names, posterior (clamp, reparameterisation), sizes, dtypes, sliced decoding."""
import copy
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from meddap.errors import MeddapError
from meddap.models.config import SD_LATENT_SCALE, SD_V1_4, TINY
from meddap.models.vae import LOGVAR_MAX, LOGVAR_MIN, AutoencoderKL, Downsample, decode_peak_bytes, sample_posterior
from oracles import VAE_PREFIX, perturb_vectors_, relative_error

SD_V1_VAE_PARAMETERS = 83_653_863  # reference/README.md


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return perturb_vectors_(AutoencoderKL(TINY.vae).eval(), torch.Generator().manual_seed(1))


def _images(batch, h, w, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_names_and_shapes_equal_the_sd_v1_checkpoint(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_checkpoint_keys.json").read_text())["required"]
    expected = {k[len(VAE_PREFIX):]: v for k, v in keys.items() if k.startswith(VAE_PREFIX)}
    with torch.device("meta"):
        vae = AutoencoderKL(SD_V1_4.vae)
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in vae.parameters()) == SD_V1_VAE_PARAMETERS
    assert vae.scale == SD_LATENT_SCALE == 0.18215


def test_decoder_up_list_is_indexed_by_resolution_level():
    # CompVis inserts each level at the front: up.0 works at full resolution
    # (ch * ch_mult[0] channels, no upsampler), up.3 right after the middle.
    with torch.device("meta"):
        vae = AutoencoderKL(SD_V1_4.vae)
    assert vae.decoder.up[0].block[0].conv1.in_channels == 256
    assert vae.decoder.up[0].block[0].conv1.out_channels == 128
    assert not hasattr(vae.decoder.up[0], "upsample")
    assert vae.decoder.up[3].block[0].conv1.in_channels == 512
    assert hasattr(vae.decoder.up[3], "upsample")


@pytest.mark.parametrize("h, w", [(240, 176), (40, 24)])  # latents 30x22, 5x3
def test_latents_are_one_eighth_of_the_image(tiny_vae, h, w):
    with torch.no_grad():
        mean, logvar = tiny_vae.encode(_images(1, h, w))
        x = tiny_vae.decode(mean)
    assert mean.shape == logvar.shape == (1, 4, h // 8, w // 8)
    assert x.shape == (1, 3, h, w)


def test_logvar_is_clamped_to_the_compvis_bounds(tiny_vae):
    vae = copy.deepcopy(tiny_vae)
    with torch.no_grad():
        # moments = quant_conv(h): zero weights make them the bias, channels
        # 0-3 the mean and 4-7 the log-variance.
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 2.0, 50.0, -50.0, 19.0, -29.0]))
        mean, logvar = vae.encode(_images(2, 16, 16))
    assert torch.all(mean[:, 0] == 0.5) and torch.all(mean[:, 3] == 2.0)
    assert torch.all(logvar[:, 0] == LOGVAR_MAX) and LOGVAR_MAX == 20.0
    assert torch.all(logvar[:, 1] == LOGVAR_MIN) and LOGVAR_MIN == -30.0
    assert torch.all(logvar[:, 2] == 19.0) and torch.all(logvar[:, 3] == -29.0)


def test_sample_posterior_is_mean_plus_std_times_the_generators_noise():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 4, 5, 7, generator=g)
    logvar = torch.randn(2, 4, 5, 7, generator=g)
    z = sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(11))
    eps = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(z, mean + torch.exp(logvar / 2) * eps, rtol=1e-6, atol=1e-6)
    # A vanishing variance returns the mean.
    assert torch.equal(sample_posterior(mean, torch.full_like(mean, LOGVAR_MIN * 10)), mean)


def test_sample_posterior_moments():
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    logvar = torch.tensor([0.0, 2.0 * torch.log(torch.tensor(3.0))]).view(1, 2, 1, 1).expand_as(mean)
    z = sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(dim=0).flatten(), torch.tensor([1.5, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(dim=0).flatten(), torch.tensor([1.0, 3.0]), atol=0.05, rtol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_agrees_with_float32(tiny_vae, dtype, tolerance):
    x = _images(1, 16, 24)
    half = copy.deepcopy(tiny_vae).to(dtype)
    with torch.no_grad():
        mean, logvar = tiny_vae.encode(x)
        decoded = tiny_vae.decode(mean)
        mean_h, logvar_h = half.encode(x.to(dtype))
        decoded_h = half.decode(mean.to(dtype))
    assert mean_h.dtype == logvar_h.dtype == decoded_h.dtype == dtype
    assert relative_error(mean_h, mean) < tolerance
    assert relative_error(logvar_h, logvar) < tolerance
    assert relative_error(decoded_h, decoded) < tolerance


@pytest.mark.parametrize("h, expected", [(8, 4), (7, 3), (6, 3), (5, 2), (2, 1)])
def test_downsample_floors_odd_sizes(h, expected):
    # Pad (0, 1, 0, 1), then a 3x3 stride-2 convolution: (h + 1 - 3) // 2 + 1 = h // 2.
    with torch.no_grad():
        y = Downsample(4)(torch.zeros(1, 4, h, h + 1))
    assert y.shape == (1, 4, expected, (h + 1) // 2)


def test_sliced_decoding_is_bitwise_decoding_each_slice(tiny_vae):
    z = torch.randn(4, 4, 5, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = tiny_vae.decoder(tiny_vae.post_quant_conv(z))
        one_by_one = torch.cat([tiny_vae.decode(z[i:i + 1]) for i in range(4)])
        assert torch.equal(tiny_vae.decode(z), whole)        # the CPU default: one batched call, as before
        assert torch.equal(tiny_vae.decode(z, slice_size=4), whole)
        assert torch.equal(tiny_vae.decode(z, slice_size=1), one_by_one)
        assert torch.equal(tiny_vae.decode(z, slice_size=3),
                           torch.cat([tiny_vae.decode(z[:3]), tiny_vae.decode(z[3:])]))
        # Against whole-batch decoding only up to rounding: kernels may differ by batch size.
        torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MeddapError, match=rf"AutoencoderKL.decode: slice_size = {bad!r}; expected a whole "
                                              r"number of images per slice, at least 1, or None"):
            tiny_vae.decode(z, slice_size=bad)


def test_decode_peak_bytes_counts_the_first_full_resolution_resnet_block():
    # SD v1: c = 128 * max(1, 2) = 256 channels at 512 x 512 pixels.
    assert decode_peak_bytes(SD_V1_4.vae, 512, 512, torch.float32) == 256 * 512 * 512 * 3 * 4 == 805_306_368
    assert decode_peak_bytes(SD_V1_4.vae, 512, 512, torch.float16) == 256 * 512 * 512 * 10 == 671_088_640
    assert decode_peak_bytes(SD_V1_4.vae, 512, 512, torch.bfloat16) == 671_088_640


class _LiveBytes(TorchDispatchMode):
    """Bytes of the operator outputs alive at once (each storage counted once), and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, ptr):
        refs, nbytes = self.live.pop(ptr)
        if refs > 1:
            self.live[ptr] = (refs - 1, nbytes)
        else:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                refs, nbytes = self.live.get(storage.data_ptr(), (0, storage.nbytes()))
                self.live[storage.data_ptr()] = (refs + 1, nbytes)
                if refs == 0:
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, storage.data_ptr())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_peak_bytes_is_the_measured_peak_of_live_activations(tiny_vae, dtype):
    vae = copy.deepcopy(tiny_vae).to(dtype)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    counter = _LiveBytes()
    with torch.no_grad(), counter:
        vae.decode(z)
    estimate = decode_peak_bytes(TINY.vae, 128, 128, dtype)
    # Beyond the estimate: only GroupNorm's per-group mean and 1/std (a few kB).
    assert estimate <= counter.peak <= estimate * 1.001
