"""Adapter files: the authors' diffusers file, our own format, conversion, wrong files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.lora import (inject_lora, load_lora, lora_layers, lora_state_dict, read_lora_file,
                         remove_lora, save_lora)
from meddap.lora.files import DIFFUSERS_TO_COMPVIS_BLOCKS, diffusers_key_to_meddap
from meddap.models.config import get_config
from meddap.models.unet import UNetModel

AUTHORS = "meddap_authors_lora_r4.safetensors"
UNET_PREFIX = "model.diffusion_model."


def diffusers_to_compvis_weights(reference_dir) -> dict[str, str]:
    """diffusers UNet weight name -> CompVis name, by diffusers' own converter
    (single_file_utils.convert_ldm_unet_checkpoint), fed the reference key list."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = json.loads((reference_dir / "sd_v1_checkpoint_keys.json").read_text())["required"]
    ldm = {k: k[len(UNET_PREFIX):] for k in keys if k.startswith(UNET_PREFIX)}
    return convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})   # values pass through: names


def processor_key_to_weight(key: str) -> tuple[str, str]:
    """'X.processor.to_out_lora.up.weight' -> ('X.to_out.0.weight', 'up')."""
    block, _, rest = key.partition(".processor.")
    proj, part = rest.split("_lora.")[0], rest.split("_lora.")[1].split(".")[0]
    return f"{block}.{'to_out.0' if proj == 'to_out' else proj}.weight", part


def test_block_table_literal():
    assert DIFFUSERS_TO_COMPVIS_BLOCKS == {
        "down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
        "down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.1.attentions.1": "input_blocks.5.1",
        "down_blocks.2.attentions.0": "input_blocks.7.1", "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.1.attentions.0": "output_blocks.3.1", "up_blocks.1.attentions.1": "output_blocks.4.1",
        "up_blocks.1.attentions.2": "output_blocks.5.1", "up_blocks.2.attentions.0": "output_blocks.6.1",
        "up_blocks.2.attentions.1": "output_blocks.7.1", "up_blocks.2.attentions.2": "output_blocks.8.1",
        "up_blocks.3.attentions.0": "output_blocks.9.1", "up_blocks.3.attentions.1": "output_blocks.10.1",
        "up_blocks.3.attentions.2": "output_blocks.11.1"}


def test_key_mapping_agrees_with_diffusers_converter(reference_dir):
    oracle = diffusers_to_compvis_weights(reference_dir)
    with safe_open(str(reference_dir / AUTHORS), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 256
    for key in keys:
        weight, part = processor_key_to_weight(key)
        expected = oracle[weight][:-len(".weight")] + f".lora_{part}"
        assert diffusers_key_to_meddap(key) == expected, key


@pytest.fixture(scope="module")
def full_unet():
    """SD v1.4's UNet at full size with random weights (3.4 GB, float32)."""
    with torch.device("meta"):
        unet = UNetModel(get_config("sd-v1.4").unet)
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 16
            p.uniform_(-1.0, 1.0, generator=g).mul_(fan_in ** -0.5)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return unet


def test_authors_file_import_output_and_export(full_unet, reference_dir, tmp_path):
    unet = full_unet
    path = reference_dir / AUTHORS
    original = load_file(str(path))
    oracle = diffusers_to_compvis_weights(reference_dir)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)              # 8x8 latents (64 px images)
    t = torch.tensor([500])
    c = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        base = unet(x, t, c)

        # import: every one of the 256 tensors lands where diffusers' converter says
        info = load_lora(unet, path)
        assert (info["format"], info["rank"], info["alpha"], info["layers"]) == ("diffusers", 4, 4.0, 128)
        placed = lora_state_dict(unet)
        assert len(placed) == 256
        for key, value in original.items():
            weight, part = processor_key_to_weight(key)
            assert torch.equal(placed[oracle[weight][:-len(".weight")] + f".lora_{part}"], value), key
        adapted = unet(x, t, c)

        # export gives the same file content: names, shapes, dtypes, values
        out = tmp_path / "exported.safetensors"
        save_lora(unet, out, to="diffusers")
        exported = load_file(str(out))
        assert exported.keys() == original.keys()
        for key, value in original.items():
            assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
        with safe_open(str(out), "pt") as f:
            assert f.metadata() == {"format": "pt"}

        # the same output as the base UNet with W0 + up @ down written in by hand
        remove_lora(unet)
        weights = dict(unet.named_parameters())
        for key, value in original.items():
            weight, part = processor_key_to_weight(key)
            if part == "up":
                down = original[key.replace("_lora.up.", "_lora.down.")]
                weights[oracle[weight]].add_(value @ down)
        merged_by_hand = unet(x, t, c)
    difference = (adapted - base).abs().max()
    assert difference > 1e-4   # the adapters matter at this size ...
    torch.testing.assert_close(adapted, merged_by_hand, rtol=1e-4, atol=difference.item() * 1e-3)


def tiny_adapted(alpha=None, targets="all", seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(get_config("tiny").unet)
    inject_lora(unet, rank=4, alpha=alpha, targets=targets, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_layers(unet).values():
            m.lora_up.normal_(0, 0.1, generator=g)
    return unet


def tiny_output(unet):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]),
                    torch.randn(1, 77, 64, generator=g))


def test_own_format_round_trip_with_metadata(tmp_path):
    unet = tiny_adapted(alpha=8.0, targets="cross")
    path = tmp_path / "a.safetensors"
    save_lora(unet, path, {"targets": "cross", "base_sha256": "ab" * 32, "base_config": "tiny",
                           "training_args": {"lr": 1e-4, "rank": 4}, "step": 17})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora_state_dict(unet))
    assert meta == {"meddap_format": "meddap-lora", "meddap_format_version": "1", "meddap_rank": "4",
                    "meddap_alpha": "8.0", "meddap_targets": '"cross"', "meddap_base_sha256": "ab" * 32,
                    "meddap_base_config": "tiny", "meddap_training_args": '{"lr": 0.0001, "rank": 4}',
                    "meddap_step": "17"}
    fresh = UNetModel(get_config("tiny").unet)
    fresh.load_state_dict({k: v for k, v in unet.state_dict().items() if "lora_" not in k}, strict=False)
    info = load_lora(fresh, path)
    assert (info["format"], info["rank"], info["alpha"], info["layers"]) == ("meddap", 4, 8.0, 64)
    assert torch.equal(tiny_output(fresh), tiny_output(unet))
    # loading again into the same adapters works; other adapters are refused
    load_lora(fresh, path)
    other = tiny_adapted(targets="all")
    with pytest.raises(MeddapError, match="remove_lora"):
        load_lora(other, path)


def test_convert_folds_alpha_and_round_trips(tmp_path, capsys):
    unet = tiny_adapted(alpha=8.0)
    ours, theirs, back = (tmp_path / n for n in ("ours.safetensors", "d.safetensors", "back.safetensors"))
    save_lora(unet, ours)
    assert main(["lora-convert", str(ours), str(theirs), "--to", "diffusers"]) == 0
    assert main(["lora-convert", str(theirs), str(back), "--to", "meddap"]) == 0
    d = read_lora_file(theirs)
    assert d.format.value == "diffusers" and d.alpha == 4.0
    # alpha/r = 2 is folded into up: (2 up) down == 2 (up down)
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert torch.equal(d.tensors[f"{key}.lora_up"], 2 * unet.get_submodule(key).lora_up.detach())
    assert json.loads(read_lora_file(back).metadata["meddap_targets"]) == "all"
    fresh = UNetModel(get_config("tiny").unet)
    fresh.load_state_dict({k: v for k, v in unet.state_dict().items() if "lora_" not in k}, strict=False)
    load_lora(fresh, back)
    torch.testing.assert_close(tiny_output(fresh), tiny_output(unet), rtol=1e-6, atol=1e-7)


def test_cli_round_trip_of_authors_file(reference_dir, tmp_path):
    ours, theirs = tmp_path / "m.safetensors", tmp_path / "d.safetensors"
    assert main(["lora-convert", str(reference_dir / AUTHORS), str(ours), "--to", "meddap"]) == 0
    assert read_lora_file(ours).metadata["meddap_targets"] == '"all"'
    assert main(["lora-convert", str(ours), str(theirs), "--to", "diffusers"]) == 0
    original, again = load_file(str(reference_dir / AUTHORS)), load_file(str(theirs))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def meta_sd_unet():
    with torch.device("meta"):
        return UNetModel(get_config("sd-v1.4").unet)


def test_sd2_shaped_adapter_is_refused(reference_dir, tmp_path):
    tensors = load_file(str(reference_dir / AUTHORS))
    for k in tensors:   # SD 2.x: cross-attention keys and values read 1024-wide OpenCLIP states
        if ".attn2.processor.to_k_lora.down" in k or ".attn2.processor.to_v_lora.down" in k:
            tensors[k] = torch.zeros(4, 1024)
    path = tmp_path / "sd2.safetensors"
    save_file(tensors, str(path))
    unet = meta_sd_unet()
    with pytest.raises(MeddapError, match=r"down \[4, 1024\].*768 -> 320.*another architecture"):
        load_lora(unet, path)
    assert not lora_layers(unet)


def test_adapter_of_other_config_or_layers_is_refused(tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    save_lora(tiny_adapted(), tiny)
    with pytest.raises(MeddapError, match="another architecture"):
        load_lora(meta_sd_unet(), tiny)
    unknown = tmp_path / "unknown.safetensors"
    meta = read_lora_file(tiny).metadata
    save_file({"input_blocks.99.1.transformer_blocks.0.attn2.to_q.lora_down": torch.zeros(4, 64),
               "input_blocks.99.1.transformer_blocks.0.attn2.to_q.lora_up": torch.zeros(64, 4)},
              str(unknown), metadata=meta)
    with pytest.raises(MeddapError, match="'input_blocks.99.1.transformer_blocks.0.attn2.to_q'.*does not have"):
        load_lora(UNetModel(get_config("tiny").unet), unknown)


def test_unreadable_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MeddapError, match="not a readable safetensors file"):
        read_lora_file(junk)
    with pytest.raises(MeddapError, match=r"adapter file \S+junk\.safetensors is not a readable safetensors "
                                          r"file \(not a safetensors file, or truncated .*\); expected a meddap"):
        read_lora_file(junk)
    damaged = tmp_path / "damaged.safetensors"
    save_lora(tiny_adapted(), damaged)
    data = damaged.read_bytes()
    damaged.write_bytes(data[:len(data) // 2])
    with pytest.raises(MeddapError, match=r"not a readable safetensors file \(tensor \S+ ends at byte"):
        read_lora_file(damaged)
    with pytest.raises(MeddapError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, str(foreign))
    with pytest.raises(MeddapError, match="neither meddap-format"):
        read_lora_file(foreign)
    rank_lie = tmp_path / "lie.safetensors"
    save_lora(tiny_adapted(), rank_lie)
    tensors, meta = load_file(str(rank_lie)), read_lora_file(rank_lie).metadata
    save_file(tensors, str(rank_lie), metadata={**meta, "meddap_rank": "8"})
    with pytest.raises(MeddapError, match="meddap_rank='8' but the tensors have rank 4"):
        read_lora_file(rank_lie)


def test_export_of_non_attention_targets_is_refused_without_output(tmp_path):
    unet = tiny_adapted(targets=["*.ff.net.2"])
    ours, theirs = tmp_path / "ff.safetensors", tmp_path / "ff_diffusers.safetensors"
    save_lora(unet, ours)
    assert main(["lora-convert", str(ours), str(theirs), "--to", "diffusers"]) == 2
    assert not theirs.exists() and list(tmp_path.iterdir()) == [ours]
