"""The KL autoencoder of Stable Diffusion v1: z ~ E(x), x ~ D(z).

MEDDAP Eq. 1 takes z = E(x), the latent of the training image; the UNet
denoises latents and the decoder D turns them into pixels. This is CompVis'
`AutoencoderKL` (CompVis/stable-diffusion commit 21f890f,
`ldm/models/autoencoder.py`, `ldm/modules/diffusionmodules/model.py`
Encoder/Decoder, `ldm/modules/distributions/distributions.py`
DiagonalGaussianDistribution) with the `first_stage_config` of
`v1-inference.yaml` (ch 128, ch_mult 1,2,4,4, two ResnetBlocks per level, no
attention except in the middle, double_z).

Module paths equal the checkpoint's keys below `first_stage_model.`. The
decoder's `up` list is indexed by resolution level like the encoder's `down`
list (`up.0` is the full-resolution level, run LAST), because CompVis builds it
with `self.up.insert(0, up)`.

Latents are unscaled here: the UNet sees `vae.scale * mean` (SD_LATENT_SCALE,
defined once in `meddap.models.config`).

Notes where we differ from CompVis:
- GroupNorm is computed in float32 for fp16/bf16 inputs (`GroupNorm32`);
  CompVis' VAE uses plain `torch.nn.GroupNorm`. Identical in float32.
- CompVis' encoder and decoder levels carry empty `attn` lists (no
  attn_resolutions in SD v1); they hold no parameters and are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meddap.errors import MeddapError
from meddap.models.attention import GroupNorm32, multi_head_attention
from meddap.models.config import VAEConfig

# GroupNorm eps of every VAE norm: CompVis `Normalize` in
# ldm/modules/diffusionmodules/model.py (commit 21f890f) uses eps=1e-6.
VAE_NORM_EPS = 1e-6

# Bounds of the posterior's log-variance: CompVis DiagonalGaussianDistribution
# `torch.clamp(self.logvar, -30.0, 20.0)` (distributions.py, commit 21f890f).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Share of the free CUDA memory that automatic slice decoding plans to fill
# with the activations counted by `decode_peak_bytes`. The other half is a
# margin, not a measurement: convolution workspaces, the caching allocator's
# rounding, and whatever else runs on the device meanwhile.
DECODE_MEMORY_FRACTION = 0.5


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): a draw from q(z | x) = N(mean, diag(exp(logvar))).

    Reparameterisation of Kingma & Welling 2014 (arXiv 1312.6114, Eq. 10).
    mean, logvar: (B, 4, h, w) -> (B, 4, h, w). The noise is drawn on the
    generator's device and moved to mean's device if they differ.
    """
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=VAE_NORM_EPS)


class ResnetBlock(nn.Module):
    """shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), shortcut = identity, or the 1x1 conv
    `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Identity() if in_channels == out_channels
                             else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))   # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))   # (B, C_out, H, W); CompVis' Dropout(p=0) left out
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, q/k/v/proj_out as 1x1 convs (CompVis `AttnBlock`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # 3 x (B, H*W, C)
        h = multi_head_attention(q, k, v, heads=1)      # (B, H*W, C), scale C^-1/2 as CompVis
        h = h.transpose(1, 2).reshape(B, C, H, W)       # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad right and bottom by one, then 3x3 conv with stride 2 and no padding: H -> floor(H / 2).

    (H + 1 - 3) // 2 + 1 = H // 2: an even H halves, an odd H drops its last
    row (7 -> 3). The UNet's Downsample rounds up instead (7 -> 4).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis: "no asymmetric padding in torch conv, must do it ourselves"
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), then `downsample` or `upsample` except at the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if name in self._modules:
                x = self._modules[name](x)
        return x


class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 * z_channels, H/8, W/8) (mean and logvar stacked)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, g))
                block_in = ch * mult
            last = level == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, downsample=None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # double_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                  # (B, ch, H, W)
        for level in self.down:
            h = level(h)                     # each but the last halves H and W
        h = self.mid(h)                      # (B, ch * ch_mult[-1], H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        block_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[Level] = []
        for level in reversed(range(len(cfg.ch_mult))):   # lowest resolution first
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * cfg.ch_mult[level], g))
                block_in = ch * cfg.ch_mult[level]
            levels.insert(0, Level(blocks, upsample=Upsample(block_in) if level else None))
        self.up = nn.ModuleList(levels)    # up.0 = full resolution (CompVis order)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))        # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):      # up.3 (lowest) ... up.0 (full resolution)
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def decode_peak_bytes(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype,
                      device_type: str = "cpu") -> int:
    """Bytes of the largest set of live activations while decoding ONE height x width image (no autograd).

    Counted along `Decoder.forward`: the largest set lives in the first
    full-resolution ResnetBlock, `up.0.block.0`, whose input x has
    c = ch * max(ch_mult[0], ch_mult[1]) channels at P = height * width
    pixels (c = 256 for SD v1). At its first norm and SiLU:
      float32, or fp16/bf16 on CUDA (GroupNorm32 calls the native kernel there):
                  x, GN(x), SiLU(GN(x))                       3 c P values x itemsize
      fp16, bf16 elsewhere: x, then GroupNorm32's float32 copy x.float()
                  and float32 result beside it                c P x (itemsize + 4 + 4) bytes
    The other layers hold less: the upsampler before it 2.25 c P values
    (input, resized, convolved), the convolutions (2 c + ch * ch_mult[0]) P.
    SD v1 at 512 x 512 per image: 805 MB in float32; 403 MB in float16 on CUDA, 671 MB on the CPU.
    Weights, convolution workspaces and allocator rounding are not included.
    """
    c = cfg.ch * max(cfg.ch_mult[:2])
    native = dtype == torch.float32 or device_type == "cuda"
    bytes_per_value = 3 * dtype.itemsize if native else dtype.itemsize + 4 + 4
    return c * height * width * bytes_per_value


class AutoencoderKL(nn.Module):
    """E: x in [-1, 1] -> q(z | x) = N(mean, diag(exp(logvar))); D: z -> x (CompVis `AutoencoderKL`).

    `scale` is the latent scale factor (0.18215 for SD v1) that the diffusion
    model's latents carry; encode/decode themselves work on unscaled z.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.scale = cfg.latent_scale
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, embed_dim, H/8, W/8), unscaled."""
        moments = self.quant_conv(self.encoder(x))        # (B, 2 * embed_dim, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)            # 2 x (B, embed_dim, H/8, W/8)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
        """Unscaled z (B, embed_dim, h, w) -> x (B, 3, 8h, 8w), about in [-1, 1] (not clipped).

        The batch is decoded `slice_size` images at a time and concatenated;
        None lets `decode_slice_size` choose by memory (the whole batch on the
        CPU). The result is bitwise the concatenation of decoding each slice
        as a batch of its own, so slice_size=1 is bitwise one-by-one decoding.
        It is NOT bitwise whole-batch decoding in general: a backend may pick
        a different convolution kernel for another batch size (on the CPU the
        two agree to about 1e-5, not bitwise).
        """
        if slice_size is None:
            slice_size = self.decode_slice_size(z)
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise MeddapError(f"AutoencoderKL.decode: slice_size = {slice_size!r}; expected a whole number of "
                              "images per slice, at least 1, or None to choose it by memory.")
        if slice_size >= z.shape[0]:
            return self.decoder(self.post_quant_conv(z))
        return torch.cat([self.decoder(self.post_quant_conv(part))       # (s, 3, 8h, 8w) each
                          for part in z.split(slice_size)])              # (B, 3, 8h, 8w)

    def decode_slice_size(self, z: torch.Tensor) -> int:
        """Images per decoding slice for latents z (B, embed_dim, h, w).

        CPU (and any non-CUDA device): the whole batch, B, so CPU results are
        those of one batched call. CUDA: as many images as fit into
        DECODE_MEMORY_FRACTION of the memory free to this process, i.e. the
        driver's free memory plus what PyTorch's caching allocator holds
        unused, at `decode_peak_bytes` per image; at least 1, at most B.
        """
        B, _, h, w = z.shape
        if z.device.type != "cuda":
            return B
        factor = 2 ** (len(self.config.ch_mult) - 1)   # 8 for SD v1
        driver_free, _ = torch.cuda.mem_get_info(z.device)
        cached_free = torch.cuda.memory_reserved(z.device) - torch.cuda.memory_allocated(z.device)
        per_image = decode_peak_bytes(self.config, factor * h, factor * w, z.dtype, "cuda")
        fits = int(DECODE_MEMORY_FRACTION * (driver_free + cached_free)) // per_image
        return max(1, min(B, fits))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction D(z), z ~ q(z | x)."""
        return self.decode(sample_posterior(*self.encode(x), generator=generator))
