"""Model configurations as data: `sd-v1.4` (the paper's base) and `tiny`.

The values of `sd-v1.4` are those of CompVis' `configs/stable-diffusion/
v1-inference.yaml` (CompVis/stable-diffusion, commit 21f890f). `tiny` keeps the
same module tree and the same parameter names (four resolution levels, two
ResBlocks per level, attention where SD has it) with few channels and layers,
so tests and CPU runs exercise exactly the code paths of SD v1.4.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from meddap.errors import MeddapError

# Latent scale factor of SD v1: z = 0.18215 * E(x), chosen so the latents have
# about unit variance (v1-inference.yaml `scale_factor`). Defined here only.
SD_LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class UNetConfig:
    """CompVis `UNetModel` settings (v1-inference.yaml `unet_config.params`)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1 = full latent resolution) whose blocks carry a
    # SpatialTransformer; SD v1 attends at factors 1, 2 and 4, not at 8.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8          # fixed head count; head width = channels / 8
    transformer_depth: int = 1
    context_dim: int = 768      # width of the text encoder's hidden states
    norm_groups: int = 32       # GroupNorm(32, C) everywhere: eps 1e-5, 1e-6 in the SpatialTransformers


@dataclass(frozen=True)
class VAEConfig:
    """CompVis `AutoencoderKL` settings (v1-inference.yaml `first_stage_config`)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)   # 3 downsamplings: H/8 x W/8 latents
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    latent_scale: float = SD_LATENT_SCALE


@dataclass(frozen=True)
class TextConfig:
    """CLIP ViT-L/14 text tower as used by SD v1 (OpenAI CLIP, QuickGELU)."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    heads: int = 12
    layers: int = 12


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)


SD_V1_4 = SDConfig(name="sd-v1.4")

# Same names and tree as SD v1.4; about 8M parameters in all; the text width is the
# UNet context. Deviation from SD's 32 groups in the UNet: 8 GroupNorm groups, so a group
# holds 4 channels at the first level (SD v1.4: 10). With 32 groups on 32 channels each
# norm removed every channel's spatial mean, and the UNet could not predict the noise's
# per-image mean: on noised phantom latents its error in that mean was the mean itself
# (0.12 rms at every t), so samples got a random per-image colour cast that no LoRA moved.
# After 300 steps on phantom latents: 0.12 rms with 32 groups, 0.07 with 8, 4 or 2.
# The VAE keeps 32 groups (its decoder draws grey phantoms, weights/tiny/README.md).
TINY = SDConfig(
    name="tiny",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_heads=2, context_dim=64,
                    norm_groups=8),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2)),
    text=TextConfig(width=64, heads=2, layers=2),
)

CONFIGS: dict[str, SDConfig] = {c.name: c for c in (SD_V1_4, TINY)}


def get_config(name: str | SDConfig) -> SDConfig:
    """Look a configuration up by name ("sd-v1.4" or "tiny")."""
    if isinstance(name, SDConfig):
        return name
    try:
        return CONFIGS[name]
    except KeyError:
        raise MeddapError(f"unknown model config {name!r}; "
                          f"choose one of {', '.join(sorted(CONFIGS))}.") from None
