"""Diffusers folder names -> original CompVis (SD v1 checkpoint) names.

Many users hold SD v1.4 as a diffusers folder (`unet/`, `vae/`,
`text_encoder/`). Our modules carry the CompVis names, so a diffusers file is
renamed once, here, and then loads like `sd-v1-4.ckpt`. The map is built by
rule from the block structure found in the file (levels, ResBlocks per
level, which levels attend), so it holds for `sd-v1.4` and `tiny` alike.

UNet (CompVis `UNetModel` vs diffusers `UNet2DConditionModel`), with n
ResBlocks per level (2 for SD v1) and L levels (4):
  input_blocks.0.0                  conv_in
  input_blocks.{1 + i(n+1) + j}.0   down_blocks.i.resnets.j       (j < n)
  input_blocks.{1 + i(n+1) + j}.1   down_blocks.i.attentions.j
  input_blocks.{1 + i(n+1) + n}.0.op  down_blocks.i.downsamplers.0.conv  (i < L-1)
  middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
  output_blocks.{i(n+1) + j}.0      up_blocks.i.resnets.j         (j <= n)
  output_blocks.{i(n+1) + j}.1      up_blocks.i.attentions.j
  output_blocks.{i(n+1) + n}.{1|2}.conv  up_blocks.i.upsamplers.0.conv
                                    (.1 when that level has no attention, else .2)
  time_embed.0 / .2                 time_embedding.linear_1 / linear_2
  out.0 / out.2                     conv_norm_out / conv_out
Inside a ResBlock: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1
time_emb_proj, out_layers.0 norm2, out_layers.3 conv2, skip_connection
conv_shortcut. Inside a SpatialTransformer the names are the same in both.

VAE (CompVis `Encoder`/`Decoder` vs diffusers `AutoencoderKL`):
  encoder.down.i.block.j            encoder.down_blocks.i.resnets.j
  encoder.down.i.downsample.conv    encoder.down_blocks.i.downsamplers.0.conv
  decoder.up.{L-1-i}.block.j        decoder.up_blocks.i.resnets.j  (diffusers counts from the bottom)
  decoder.up.{L-1-i}.upsample.conv  decoder.up_blocks.i.upsamplers.0.conv
  {en,de}coder.mid.block_1 / attn_1 / block_2   mid_block.resnets.0 / attentions.0 / resnets.1
  {en,de}coder.norm_out             conv_norm_out
Inside a ResnetBlock nin_shortcut is conv_shortcut; inside the mid attention
norm, q, k, v, proj_out are group_norm, to_q, to_k, to_v, to_out.0 (older
diffusers files: query, key, value, proj_attn), stored as (C, C) Linear
weights where CompVis has (C, C, 1, 1) 1x1 convolutions.

Text encoder: Hugging Face CLIPTextModel names, as in SD v1 checkpoints,
below `text_model.` (older transformers) or with no prefix (transformers 5).
"""
from __future__ import annotations

import re

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _indices(keys: list[str], pattern: str) -> set[int]:
    """The integers that `pattern`'s one group takes over `keys`."""
    found = (re.match(pattern, k) for k in keys)
    return {int(m.group(1)) for m in found if m}


def unet_prefixes(keys: list[str]) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, CompVis prefix, renames of the next name part) for a UNet file's keys."""
    L = max(_indices(keys, r"down_blocks\.(\d+)\.")) + 1
    n = max(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")) + 1
    attends = _indices(keys, r"down_blocks\.(\d+)\.attentions\.")   # levels with attention
    out = [("conv_in", "input_blocks.0.0", {}),
           ("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
           ("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
           ("mid_block.attentions.0", "middle_block.1", {}),
           ("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
           ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {})]
    for i in range(L):                          # down path, level i at 1/2^i resolution
        for j in range(n):
            k = 1 + i * (n + 1) + j
            out += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", UNET_RESNET),
                    (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", {})]
        if i < L - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (n + 1) + n}.0.op", {}))
    for i in range(L):                          # up path, up block i works at level L-1-i
        for j in range(n + 1):
            k = i * (n + 1) + j
            out += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", UNET_RESNET),
                    (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", {})]
        if i < L - 1:
            slot = 2 if (L - 1 - i) in attends else 1
            out.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (n + 1) + n}.{slot}.conv", {}))
    return out


def vae_prefixes(keys: list[str]) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, CompVis prefix, renames of the next name part) for a VAE file's keys."""
    L = max(_indices(keys, r"encoder\.down_blocks\.(\d+)\.")) + 1
    out = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for side in ("encoder", "decoder"):
        out += [(f"{side}.conv_in", f"{side}.conv_in", {}), (f"{side}.conv_out", f"{side}.conv_out", {}),
                (f"{side}.conv_norm_out", f"{side}.norm_out", {}),
                (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET),
                (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION),
                (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET)]
    for i in range(L):
        out += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", {}),
                (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}),
                (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{L - 1 - i}.block", {}),
                (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{L - 1 - i}.upsample.conv", {})]
    return out


def rename(key: str, prefixes: list[tuple[str, str, dict]]) -> str | None:
    """CompVis name of a diffusers key, or None when no rule covers it."""
    for src, dst, inner in prefixes:
        if not key.startswith(src + "."):
            continue
        rest = key[len(src) + 1:]                                   # e.g. "0.conv_shortcut.weight"
        if dst.endswith(".block"):                                  # VAE ResnetBlock list: "j.<part>"
            j, rest = rest.split(".", 1)
            dst, inner = f"{dst}.{j}", VAE_RESNET
        for a, b in inner.items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
                break
        return f"{dst}.{rest}"
    return None


def text_key(key: str) -> str:
    """HF CLIPTextModel key from a diffusers `text_encoder/` file, without `text_model.`."""
    return key[len("text_model."):] if key.startswith("text_model.") else key
