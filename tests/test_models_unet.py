"""UNet: checkpoint names, timestep embedding, any latent size, dtypes, gradient checkpointing, errors."""
import copy
import json
import math

import pytest
import torch

from meddap.errors import MeddapError
from meddap.models.config import SD_V1_4, TINY
from meddap.models.unet import UNetModel, timestep_embedding
from oracles import UNET_PREFIX, perturb_vectors_, relative_error

SD_V1_UNET_PARAMETERS = 859_520_964  # reference/README.md


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return perturb_vectors_(UNetModel(TINY.unet).eval(), torch.Generator().manual_seed(1))


def _inputs(batch, h, w, context_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, context_dim, generator=g)
    return x, t, context


def test_names_and_shapes_equal_the_sd_v1_checkpoint(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_checkpoint_keys.json").read_text())["required"]
    expected = {k[len(UNET_PREFIX):]: v for k, v in keys.items() if k.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        unet = UNetModel(SD_V1_4.unet)
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in unet.parameters()) == SD_V1_UNET_PARAMETERS
    # The attention layout LoRA relies on (contracts.md).
    attn2 = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2")
    assert isinstance(attn2.to_out[0], torch.nn.Linear) and attn2.to_k.in_features == 768


def test_timestep_embedding_closed_form_cos_first():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)                        # (3, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 1, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=0, atol=2e-4)
    assert emb.dtype == torch.float32
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, :8], emb) and torch.all(odd[:, 8] == 0)


def test_timestep_embedding_equals_diffusers_flip_sin_to_cos():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.arange(0, 1000, 37)
    ours = timestep_embedding(t, 320)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h, w", [(28, 28), (30, 22), (9, 13), (3, 2)])
def test_any_latent_size_keeps_its_shape(tiny_unet, h, w):
    # 28 -> 14 -> 7 -> 4 on the way down; CompVis' fixed x2 upsampling would
    # give 8 != 7 at the first concatenation.
    x, t, context = _inputs(1, h, w, TINY.unet.context_dim)
    with torch.no_grad():
        eps = tiny_unet(x, t, context)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_batch_rows_are_independent_and_scalar_t_broadcasts(tiny_unet):
    x, t, context = _inputs(3, 16, 12, TINY.unet.context_dim)
    t = torch.full((3,), 421)
    with torch.no_grad():
        batched = tiny_unet(x, t, context)
        single = tiny_unet(x[1:2], t[1:2], context[1:2])
        scalar_t = tiny_unet(x, torch.tensor(421), context)
    torch.testing.assert_close(batched[1:2], single, rtol=1e-5, atol=1e-5)
    assert torch.equal(scalar_t, batched)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_agrees_with_float32(tiny_unet, dtype, tolerance):
    x, t, context = _inputs(1, 16, 12, TINY.unet.context_dim)
    half = copy.deepcopy(tiny_unet).to(dtype)
    with torch.no_grad():
        reference = tiny_unet(x, t, context)
        eps = half(x.to(dtype), t, context.to(dtype))
    assert eps.dtype == dtype
    assert relative_error(eps, reference) < tolerance


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_unet):
    x, t, context = _inputs(2, 8, 8, TINY.unet.context_dim)
    unet = copy.deepcopy(tiny_unet)
    calls = []
    # Hooks on each block's FIRST layer: the recomputation stops early once
    # the last saved tensor is rebuilt, so later layers' hooks may not fire.
    unet.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.append(1))
    unet.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        unet.zero_grad()
        unet(x, t, context).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    assert unet.gradient_checkpointing is False
    plain = grads()
    assert len(calls) == 2
    calls.clear()
    unet.gradient_checkpointing = True
    assert unet.gradient_checkpointing is True
    checkpointed = grads()
    assert len(calls) == 4                          # each checkpointed layer ran again in backward
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_wrong_shapes_are_named(tiny_unet):
    x, t, context = _inputs(2, 8, 8, TINY.unet.context_dim)
    with pytest.raises(MeddapError, match=r"expected \(B, 4, h, w\)"):
        tiny_unet(x[:, :3], t, context)
    with pytest.raises(MeddapError, match=r"timesteps t have shape \(3,\); expected \(2,\)"):
        tiny_unet(x, torch.zeros(3, dtype=torch.long), context)
    with pytest.raises(MeddapError, match=r"context has shape \(2, 77, 1024\).*SD 2 uses 1024"):
        tiny_unet(x, t, torch.zeros(2, 77, 1024))
