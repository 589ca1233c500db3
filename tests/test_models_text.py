"""Text encoder: parity with transformers' CLIPTextModel, the name map, SD v1 semantics."""
import pytest
import torch

from meddap.models.config import get_config
from meddap.models.text_encoder import TextEncoder, hf_to_open_clip, open_clip_to_hf, tokenize
from oracles import perturb_vectors_, relative_error
from sd_files import transformers_text_model

PROMPTS = ["an ultrasound image of benign tumor in the breast",
           "dark ultrasound image of no tumor in the breast", ""]


@pytest.mark.parametrize("config", ["tiny", "sd-v1.4"])
def test_parity_with_transformers_clip(config):
    torch.manual_seed(0)
    ours = perturb_vectors_(TextEncoder(get_config(config).text), torch.Generator().manual_seed(1)).eval()
    oracle = transformers_text_model(ours)
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        expected = oracle(input_ids=tokens).last_hidden_state   # all 77 positions, causal mask only
        got = ours(tokens)
    assert got.shape == (3, 77, ours.config.width)
    assert relative_error(got, expected) <= 1e-4
    # the comparison can fail: a one-layer change is far outside the tolerance
    with torch.no_grad():
        ours.transformer.resblocks[-1].ln_2.bias.add_(0.1)
        assert relative_error(ours(tokens), expected) > 1e-3


def test_full_size_parameter_count_and_names():
    with torch.device("meta"):
        enc = TextEncoder(get_config("sd-v1.4").text)
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480   # reference: text encoder total
    assert not any("text_projection" in k for k in enc.state_dict())  # SD v1 has no projection


def test_name_map_both_directions(reference_dir):
    import json
    ref = json.loads((reference_dir / "sd_v1_checkpoint_keys.json").read_text())["required"]
    prefix = "cond_stage_model.transformer.text_model."
    with torch.device("meta"):
        enc = TextEncoder(get_config("sd-v1.4").text)
    hf_shapes = {k: list(v.shape) for k, v in open_clip_to_hf(enc.state_dict()).items()}
    assert hf_shapes == {k[len(prefix):]: s for k, s in ref.items() if k.startswith(prefix)}
    # HF -> ours -> HF and ours -> HF -> ours are identities, tensor for tensor
    torch.manual_seed(0)
    small = TextEncoder(get_config("tiny").text)
    ours = small.state_dict()
    hf = open_clip_to_hf(ours)
    assert "encoder.layers.1.self_attn.k_proj.weight" in hf and "final_layer_norm.bias" in hf
    back = hf_to_open_clip(hf)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    again = open_clip_to_hf(back)
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)
    # fused in_proj is cat(q, k, v) in that order
    w = ours["transformer.resblocks.0.attn.in_proj_weight"]
    d = small.config.width
    assert torch.equal(hf["encoder.layers.0.self_attn.k_proj.weight"], w[d:2 * d])


def test_causal_mask():
    torch.manual_seed(0)
    enc = TextEncoder(get_config("tiny").text).eval()
    a, b = tokenize(["a photo of a cat", "a photo of a dog"])  # differ at position 5
    with torch.no_grad():
        ha, hb = enc(torch.stack([a, b]))
    assert torch.equal(ha[:5], hb[:5]) and not torch.allclose(ha[5:], hb[5:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    torch.manual_seed(0)
    enc = TextEncoder(get_config("tiny").text).eval()
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        ref = enc(tokens)
        got = enc.to(dtype)(tokens)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_error(got, ref) < 2e-2
