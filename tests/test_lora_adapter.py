"""USLoRA adapter (MEDDAP Eq. 3): identity at init, what trains, counts, merge/unmerge."""
import json

import pytest
import torch
from torch import nn

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.lora import (LoRALinear, count_parameters, disable_lora, enable_lora, inject_lora,
                         load_base_state_dict, lora_layers, lora_parameters, lora_state_dict,
                         merge_lora, remove_lora, set_lora_scale, unmerge_lora)
from meddap.models.config import get_config
from meddap.models.unet import UNetModel

TINY = get_config("tiny").unet


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model kernels gain nothing from threads; on a busy machine two spinning
    OpenMP threads slow them down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNetModel(TINY)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)                  # (B, 4, h, w)
    t = torch.tensor([3, 800])
    c = torch.randn(2, 77, TINY.context_dim, generator=g).to(dtype)     # (B, 77, C_ctx)
    return x, t, c


def randomise_up(unet, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(unet).values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.1)


@pytest.mark.parametrize("targets", ["cross", "all"])
def test_identity_at_init_is_bitwise(targets):
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.no_grad():
        base = unet(x, t, c)
        inject_lora(unet, rank=4, targets=targets)
        adapted = unet(x, t, c)
    assert torch.equal(base, adapted)
    # and the adapter is live: a non-zero `up` changes the output
    randomise_up(unet)
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, c), base)


def test_identity_and_float32_adapters_with_bf16_base():
    unet = tiny_unet().to(torch.bfloat16)
    x, t, c = inputs(torch.bfloat16)
    with torch.no_grad():
        base = unet(x, t, c)
        inject_lora(unet, rank=4)
        adapted = unet(x, t, c)
    assert adapted.dtype == torch.bfloat16 and torch.equal(base, adapted)
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))
    # the branch itself: y = W0 x + scale * up(down(x.float())), added back in bf16
    layer = next(iter(lora_layers(unet).values()))
    randomise_up(unet)
    xin = torch.randn(3, layer.in_features).to(torch.bfloat16)
    expected = nn.functional.linear(xin, layer.weight, layer.bias) + (
        xin.float() @ layer.lora_down.T @ layer.lora_up.T).to(torch.bfloat16)
    assert torch.equal(layer(xin), expected)


def test_float32_gradients_through_a_bf16_base():
    unet = tiny_unet().to(torch.bfloat16)
    inject_lora(unet, rank=4)
    randomise_up(unet)
    x, t, c = inputs(torch.bfloat16)
    unet(x, t, c).float().square().mean().backward()
    grads = [p.grad for p in lora_parameters(unet)]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_targets_and_names():
    unet = tiny_unet()
    names = inject_lora(unet, rank=2, targets="cross")
    assert len(names) == 16 * 4 and all(".attn2." in n for n in names)
    assert {n.rsplit("attn2.", 1)[1] for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert isinstance(unet.get_submodule("middle_block.1.transformer_blocks.0.attn2.to_out.0"), LoRALinear)
    remove_lora(unet)
    assert not lora_layers(unet)
    names = inject_lora(unet, rank=2, targets=["input_blocks.1.*.attn1.to_[qk]", "*.ff.net.2"])
    assert names == ["input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                     "input_blocks.1.1.transformer_blocks.0.attn1.to_k"] + [
        n for n in names if n.endswith("ff.net.2")]
    assert len(names) == 2 + 16


def test_only_adapters_receive_gradients():
    unet = tiny_unet()
    inject_lora(unet, rank=4, targets="all")
    randomise_up(unet)   # with up = 0 only `up` would get a gradient
    x, t, c = inputs()
    unet(x, t, c).square().mean().backward()
    adapter = {id(p) for p in lora_parameters(unet)}
    for name, p in unet.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("targets,trainable", [("cross", 397_824), ("all", 797_184)])
def test_sd_v1_4_counts_on_meta(targets, trainable):
    with torch.device("meta"):
        unet = UNetModel(get_config("sd-v1.4").unet)
    inject_lora(unet, rank=4, targets=targets)
    assert count_parameters(unet) == (trainable, 859_520_964)


def test_lora_info_json(capsys):
    assert main(["lora-info", "--config", "sd-v1.4", "--rank", "4", "--targets", "cross", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable"] == 397_824 and report["unet_parameters"] == 859_520_964
    assert round(100 * report["ratio"], 4) == 0.0463
    assert main(["lora-info", "--targets", "all"]) == 0
    assert "797,184 of 859,520,964 in the UNet (0.0927%)" in capsys.readouterr().out


def test_merge_unmerge_round_trip():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inject_lora(unet, rank=4, alpha=8, targets="all")
    randomise_up(unet)
    x, t, c = inputs()
    with torch.no_grad():
        adapted = unet(x, t, c)
        merge_lora(unet)
        merged = unet(x, t, c)
        # merged weight = W0 + (alpha/r) up @ down, written out here by hand
        layer = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
        key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        torch.testing.assert_close(layer.weight, before[key] + 2.0 * layer.lora_up @ layer.lora_down)
        unmerge_lora(unet)
        unmerged = unet(x, t, c)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-5)   # W0 + ΔW − ΔW rounds
    after = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)


def test_enable_disable_scale():
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.no_grad():
        base = unet(x, t, c)
        inject_lora(unet, rank=4)
        randomise_up(unet)
        full = unet(x, t, c)
        disable_lora(unet)
        assert torch.equal(unet(x, t, c), base)
        enable_lora(unet)
        set_lora_scale(unet, 0.0)
        assert torch.equal(unet(x, t, c), base)
        set_lora_scale(unet, 1.0)
        assert torch.equal(unet(x, t, c), full)
        merge_lora(unet)
    with pytest.raises(MeddapError, match="unmerge_lora"):
        set_lora_scale(unet, 0.5)
    with pytest.raises(MeddapError, match="unmerge_lora"):
        disable_lora(unet)


def test_base_checkpoint_loads_after_injection():
    donor = tiny_unet(seed=5)
    base_sd = donor.state_dict()
    unet = tiny_unet()
    inject_lora(unet, rank=4)
    # the keys are the base keys plus exactly the adapters'
    assert set(unet.state_dict()) == set(base_sd) | set(lora_state_dict(unet))
    missing, unexpected = unet.load_state_dict(base_sd, strict=False)
    assert set(missing) == set(lora_state_dict(unet)) and not unexpected
    load_base_state_dict(unet, base_sd)
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, c), donor(x, t, c))
    with pytest.raises(MeddapError, match="missing"):
        load_base_state_dict(unet, {k: v for k, v in base_sd.items() if not k.startswith("out.")})


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank 0 is not a positive integer"),
    ({"rank": -2}, "rank -2 is not a positive integer"),
    ({"rank": 4, "alpha": 0}, "alpha 0 is not a positive number"),
    ({"rank": 4, "targets": ["*.attn2.to_k", "*.attn3.*"]}, r"pattern '\*\.attn3\.\*' matches no"),
    ({"rank": 4, "targets": "crosss"}, "unknown LoRA target set 'crosss'"),
])
def test_bad_injection_arguments(kwargs, match):
    unet = tiny_unet()
    with pytest.raises(MeddapError, match=match):
        inject_lora(unet, **kwargs)
    assert not lora_layers(unet)


def test_double_injection_is_refused():
    unet = tiny_unet()
    inject_lora(unet)
    with pytest.raises(MeddapError, match="already carries"):
        inject_lora(unet)


def test_presets_table_drives_targets(monkeypatch):
    """One table: a new entry is a preset for target_patterns, the parse rule and the check."""
    from meddap.lora.adapter import TARGET_PRESETS, check_targets, parse_targets, target_patterns

    assert TARGET_PRESETS == {
        "cross": ("*.attn2.to_q", "*.attn2.to_k", "*.attn2.to_v", "*.attn2.to_out.0"),
        "all": ("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.attn1.to_out.0",
                "*.attn2.to_q", "*.attn2.to_k", "*.attn2.to_v", "*.attn2.to_out.0")}
    assert target_patterns("cross") == TARGET_PRESETS["cross"]
    assert check_targets("ff") == ("is not a target preset ('cross', 'all'); give a preset or a list "
                                   "of layer-name patterns such as '*.attn2.to_k'")
    monkeypatch.setitem(TARGET_PRESETS, "ff", ("*.ff.net.2",))
    assert target_patterns("ff") == ("*.ff.net.2",)
    assert parse_targets(["ff"]) == "ff" and parse_targets("ff") == "ff" and check_targets("ff") is None
    names = inject_lora(tiny_unet(), rank=2, targets="ff")
    assert len(names) == 16 and all(n.endswith(".ff.net.2") for n in names)


@pytest.mark.parametrize("given,parsed", [
    ("cross", "cross"), (["cross"], "cross"), (["all"], "all"), ("*.attn2.to_k", ("*.attn2.to_k",)),
    (["*.attn2.to_k", "*.attn2.to_v"], ("*.attn2.to_k", "*.attn2.to_v")),
    (["cross", "*.attn1.to_q"], ("cross", "*.attn1.to_q")),   # a preset name among patterns is a pattern
    (5, 5),                                                   # left for the check to name
])
def test_targets_parse_rule(given, parsed):
    from meddap.lora.adapter import parse_targets

    assert parse_targets(given) == parsed


def test_lora_info_reads_the_adapter_declarations(capsys):
    assert main(["lora-info", "--config", "tiny", "--rank", "2", "--alpha", "4", "--targets", "all",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rank"], report["alpha"], report["targets"], report["layers"]) == (2, 4.0, "all", 16 * 8)
    assert main(["lora-info", "--rank", "0"]) == 2
    assert "--rank = 0 is out of range; use a value from 1 to 1024 (the paper uses 4)." in capsys.readouterr().err
