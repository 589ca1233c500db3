"""The model stack on a fake CUDA device (tests/fake_cuda.py): device rules as on a GPU, and every
host<->device copy or sync of one forward pass, by the meddap line that issues it.

These run on the CPU without a driver. An expectation like
{("cpu->cuda", "meddap/models/unet.py:344"): 1} says that one UNet forward
with a CPU t copies t to the device once and never waits for the device; a
change that adds a copy or a .item() fails here with the line that added it.
"""
from collections import Counter

import pytest
import torch

from fake_cuda import FakeCudaValueError, fake_cuda, line_of
from meddap.models.config import TINY
from meddap.models.text_encoder import TextEncoder
from meddap.models.unet import UNetModel
from meddap.models.vae import DECODE_MEMORY_FRACTION, AutoencoderKL, decode_peak_bytes

DTYPES = [torch.float32, torch.float16]
MISMATCH = "Expected all tensors to be on the same device"
UNET_T_TO_DEVICE = ("cpu->cuda", line_of("meddap/models/unet.py", "t = t.to(self.time_embed[0].weight.device)"))
TEXT_TOKENS_TO_DEVICE = ("cpu->cuda", line_of("meddap/models/text_encoder.py",
                                              "tokens = tokens.to(self.token_embedding.weight.device)"))


def test_a_cpu_tensor_meeting_cuda_weights_raises_as_on_a_gpu():
    with fake_cuda() as fc:
        with torch.device("cuda"):
            linear = torch.nn.Linear(3, 4)
            conv = torch.nn.Conv2d(3, 4, 3)
        assert linear.weight.device == fc.device
        with pytest.raises(RuntimeError, match=MISMATCH):
            linear(torch.randn(2, 3))                       # a CPU input in a matmul
        with pytest.raises(RuntimeError, match=MISMATCH):
            conv(torch.randn(1, 3, 8, 8))                   # a CPU input in a convolution
        out = linear(torch.randn(2, 3, device="cuda")) * torch.tensor(2.0)   # a 0-d CPU scalar is allowed
        assert out.device == fc.device and out.shape == (2, 4)


def test_the_counter_names_kind_and_line_and_cpu_values_stay_real():
    with fake_cuda() as fc:
        x = torch.arange(4.0).to("cuda")                    # cpu->cuda
        x.cpu()                                             # cuda->cpu
        with pytest.raises(FakeCudaValueError, match=r"outside meddap: \.item\(\)"):
            x.sum().item()                                  # item
        assert torch.arange(5).sum().item() == 10           # CPU tensors compute for real
    assert fc.syncs == Counter({("cpu->cuda", "outside meddap"): 1, ("cuda->cpu", "outside meddap"): 1,
                                ("item", "outside meddap"): 1})
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_unet_takes_t_from_either_device_and_copies_only_a_cpu_t(dtype):
    B = 2
    with fake_cuda(dtype) as fc:
        with torch.device("cuda"):
            unet = UNetModel(TINY.unet)
            x = torch.randn(B, 4, 12, 8)
            context = torch.randn(B, 77, TINY.unet.context_dim)
        cases = {
            "cpu (B,)": (torch.tensor([999, 1]), {UNET_T_TO_DEVICE: 1}),
            "cpu ()": (torch.tensor(500), {UNET_T_TO_DEVICE: 1}),
            "cuda (B,)": (torch.tensor([999, 1], device="cuda"), {}),
            "cuda ()": (torch.tensor(500, device="cuda"), {}),
        }
        for name, (t, expected) in cases.items():
            fc.reset()
            with torch.no_grad():
                eps = unet(x, t, context)
            assert (eps.shape, eps.device, eps.dtype) == (x.shape, fc.device, dtype), name
            assert fc.syncs == Counter(expected), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_text_encoder_moves_cpu_token_ids_once(dtype):
    with fake_cuda(dtype) as fc:
        with torch.device("cuda"):
            text_encoder = TextEncoder(TINY.text)
        tokens = text_encoder.tokenize(["benign breast ultrasound", "malignant"])    # (2, 77) CPU
        assert tokens.device.type == "cpu"
        fc.reset()
        with torch.no_grad():
            states = text_encoder(tokens)
        assert (states.shape, states.device, states.dtype) == ((2, 77, TINY.text.width), fc.device, dtype)
        assert fc.syncs == Counter({TEXT_TOKENS_TO_DEVICE: 1})
        fc.reset()
        with torch.no_grad():
            text_encoder(tokens.to("cuda"))
        assert fc.syncs == Counter({("cpu->cuda", "outside meddap"): 1})   # the test's own .to


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slice_size", [None, 1, 2])
def test_vae_encode_and_sliced_decode_stay_on_the_device_without_syncs(dtype, slice_size):
    with fake_cuda(dtype) as fc:
        with torch.device("cuda"):
            vae = AutoencoderKL(TINY.vae)
            x = torch.rand(3, 3, 32, 24) * 2 - 1
        fc.reset()
        with torch.no_grad():
            mean, logvar = vae.encode(x)
            decoded = vae.decode(mean, slice_size=slice_size)
        assert mean.shape == logvar.shape == (3, 4, 4, 3) and mean.device == fc.device
        assert (decoded.shape, decoded.device, decoded.dtype) == (x.shape, fc.device, dtype)
        assert fc.syncs == Counter()


@pytest.mark.parametrize("dtype, bytes_per_value", [(torch.float32, 12), (torch.float16, 6)])   # native GN on CUDA
@pytest.mark.parametrize("images_that_fit, slices", [(0, [1] * 5), (2, [2, 2, 1]), (5, [5]), (40, [5])])
def test_cuda_decode_slices_by_free_memory(dtype, bytes_per_value, images_that_fit, slices):
    # Tiny VAE: c = ch * max(ch_mult[:2]) = 64 channels at full resolution; latents 4 x 3 -> 32 x 24 px.
    per_image = 64 * 32 * 24 * bytes_per_value
    assert decode_peak_bytes(TINY.vae, 32, 24, dtype, "cuda") == per_image
    free = int(images_that_fit * per_image / DECODE_MEMORY_FRACTION)
    with fake_cuda(dtype, free_bytes=free) as fc:
        with torch.device("cuda"):
            vae = AutoencoderKL(TINY.vae)
            z = torch.randn(5, 4, 4, 3)
        batches = []
        vae.decoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
        with torch.no_grad():
            decoded = vae.decode(z)
        assert decoded.shape == (5, 3, 32, 24) and decoded.device == fc.device
        assert batches == slices
        assert fc.syncs == Counter()
