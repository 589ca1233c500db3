"""Test-only oracles: diffusers models that hold the same weights as ours.

Our modules carry CompVis checkpoint names. To compare with diffusers we do
what diffusers does when it loads an original SD file
(`from_single_file`): describe the model as a CompVis `v1-inference.yaml`
dict, let `diffusers.loaders.single_file_utils` derive the diffusers config
(`create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`)
and rename the tensors (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`), then load them strictly into
`UNet2DConditionModel` / `AutoencoderKL`. Nothing here is hand-mapped, so a
naming mistake on our side shows up as a strict-load failure or a parity
failure, not as a matching mistake in a map we wrote ourselves.

Only tests import this file (diffusers is a test-only extra).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from meddap.models.config import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def ldm_original_config(unet: UNetConfig | None = None, vae: VAEConfig | None = None) -> dict:
    """Our configs written as the CompVis yaml dict that single_file_utils reads."""
    unet, vae = unet or UNetConfig(), vae or VAEConfig()
    return {"model": {"params": {
        "scale_factor": vae.latent_scale,
        "unet_config": {"params": {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": unet.model_channels, "channel_mult": list(unet.channel_mult),
            "num_res_blocks": unet.num_res_blocks,
            "attention_resolutions": list(unet.attention_resolutions),
            "num_heads": unet.num_heads, "transformer_depth": unet.transformer_depth,
            "context_dim": unet.context_dim, "use_spatial_transformer": True, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": {
            "double_z": True, "z_channels": vae.z_channels, "in_channels": vae.in_channels,
            "out_ch": vae.out_ch, "ch": vae.ch, "ch_mult": list(vae.ch_mult),
            "num_res_blocks": vae.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}}},
    }}}


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The diffusers `UNet2DConditionModel` config diffusers itself derives for `cfg`."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    with warnings.catch_warnings():  # image_size is deprecated there, but without it the size is guessed from keys
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(ldm_original_config(unet=cfg), {}, image_size=512)
    config["norm_num_groups"] = cfg.norm_groups
    return config


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """The diffusers `AutoencoderKL` config diffusers itself derives for `cfg`."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    with warnings.catch_warnings():  # as in diffusers_unet_config
        warnings.simplefilter("ignore", FutureWarning)
        config = create_vae_diffusers_config_from_ldm(ldm_original_config(vae=cfg), {}, image_size=512)
    config["norm_num_groups"] = cfg.norm_groups
    return config


def _with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k if k.startswith(prefix) else prefix + k: v for k, v in state_dict.items()}


def _load(model_cls, config: dict, converted: dict[str, torch.Tensor], share: bool) -> nn.Module:
    """Build on the meta device and load strictly; share=True reuses our tensors (no copy)."""
    with torch.device("meta"):
        model = model_cls(**config)
    if not share:
        converted = {k: v.detach().clone() for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def diffusers_unet_from_ours(state_dict: dict[str, torch.Tensor], cfg: UNetConfig,
                             share: bool = False) -> nn.Module:
    """diffusers `UNet2DConditionModel` with the weights of our UNet state dict.

    `state_dict` keys may carry `model.diffusion_model.` or not. With
    share=True the diffusers model uses the very same tensors (saves memory;
    in-place changes to ours then show in both).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = diffusers_unet_config(cfg)
    converted = convert_ldm_unet_checkpoint(_with_prefix(state_dict, UNET_PREFIX), config)
    return _load(UNet2DConditionModel, config, converted, share)


def diffusers_vae_from_ours(state_dict: dict[str, torch.Tensor], cfg: VAEConfig,
                            share: bool = False) -> nn.Module:
    """diffusers `AutoencoderKL` with the weights of our VAE state dict (prefix `first_stage_model.` optional)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config = diffusers_vae_config(cfg)
    converted = convert_ldm_vae_checkpoint(_with_prefix(state_dict, VAE_PREFIX), config)
    return _load(AutoencoderKL, config, converted, share)


@torch.no_grad()
def perturb_vectors_(module: nn.Module, generator: torch.Generator, scale: float = 0.1) -> nn.Module:
    """Add N(0, scale^2) noise to every 1-D parameter (biases, norm weights and biases).

    Default init leaves norm weights at 1 and biases at 0, so a swapped or
    dropped norm would go unnoticed in a parity test; this makes each one count.
    """
    for p in module.parameters():
        if p.ndim == 1:
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
