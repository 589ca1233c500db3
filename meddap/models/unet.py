"""The noise-prediction UNet eps_theta(z_t, t, c) of Stable Diffusion v1.

MEDDAP Eq. 1 trains eps_theta to predict the noise eps added to the latent
z_t; this module is that network. It follows CompVis' `UNetModel`
(CompVis/stable-diffusion commit 21f890f, `ldm/modules/diffusionmodules/
openaimodel.py` and `ldm/modules/attention.py`) with the SD v1 settings of
`v1-inference.yaml` (use_spatial_transformer, legacy=False, dims=2, no class
labels, dropout 0).

Module paths equal the checkpoint's keys below `model.diffusion_model.`:
`time_embed.{0,2}`, `input_blocks.N.{0,1}`, `middle_block.{0,1,2}`,
`output_blocks.N.{0,1,2}`, `out.{0,2}`. Identity placeholders stand where
CompVis has parameter-free layers (SiLU, Dropout(p=0)) so that indices such as
`out_layers.3` line up. Loading a checkpoint is strip-the-prefix then
`load_state_dict(strict=True)`.

Notes where we differ from CompVis (none changes the function on the sizes
CompVis accepts):
- CompVis zero-initialises `out_layers.3`, `proj_out` and `out.2` for training
  from scratch. We never train from scratch (weights come from the checkpoint),
  and PyTorch's default initialisation keeps every path live in random-weight
  tests.
- The upsampler resizes to the size of the skip connection it is about to be
  concatenated with, instead of a fixed x2; see `Upsample`.
- Gradient checkpointing is off by default and switched on with
  `unet.gradient_checkpointing = True` (CompVis: `use_checkpoint`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meddap.errors import MeddapError
from meddap.models.attention import GroupNorm32, multi_head_attention
from meddap.models.config import UNetConfig

# Sinusoidal timestep embedding of CompVis' `timestep_embedding`
# (openaimodel.py / util.py, commit 21f890f): frequencies
# exp(-ln(10000) * i / half), i = 0..half-1, and the cos half comes FIRST
# (the transformer embedding of Vaswani et al. 2017, Sec. 3.5, with the
# halves swapped). diffusers reproduces it with flip_sin_to_cos=True,
# freq_shift=0.
TIMESTEP_MAX_PERIOD = 10000

# GroupNorm eps inside SpatialTransformer (CompVis `Normalize` in attention.py:
# eps=1e-6); the ResBlocks and the output head use GroupNorm32's torch
# default 1e-5.
TRANSFORMER_NORM_EPS = 1e-6
RESBLOCK_NORM_EPS = 1e-5


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """[cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i/half), i < half = dim // 2.

    t: (B,) integer or float timesteps -> (B, dim) float32 on t's device; odd
    dim is padded with one zero column, as in CompVis.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t[:, None].float() * freqs[None]                                   # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))                                              # (B, dim)
    return emb


class ResBlock(nn.Module):
    """skip(x) + out_layers(in_layers(x) + emb_layers(emb)), CompVis' ResBlock with its layer names:

    in_layers(x)     = conv3x3(SiLU(GN(x)))
    emb_layers(emb)  = W SiLU(emb) + b, one value per channel, broadcast over the pixels
    out_layers(h)    = conv3x3(SiLU(GN(h)))   (an Identity where CompVis has Dropout(p=0))
    skip             = identity, or the 1x1 conv `skip_connection` when the channel count changes
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.gradient_checkpointing = False
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Identity(),  # CompVis: Dropout(p=0)
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # 1x1 conv only when the channel count changes (CompVis: conv_nd(dims, C, C_out, 1)).
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W), emb: (B, 4 * model_channels)
        h = self.in_layers(x)                            # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]   # (B, C_out, 1, 1) broadcast
        h = self.out_layers(h)                           # (B, C_out, H, W)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V with Q = x W_q, K = c W_k, V = c W_v, then W_o.

    Self-attention (`attn1`) when no context is given. `to_out` is
    Sequential(Linear, Identity) so its Linear is `to_out.0` as in the
    checkpoint (CompVis: Dropout(p=0) at index 1).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, C); context: (B, L, C_ctx) or None for self-attention
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context),
                                   self.heads)          # (B, T, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) * GELU(x V + c) (Shazeer 2020, arXiv 2002.05202, Eq. 5)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, T, dim_out): value half first
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """`net` = [GEGLU(C -> 4C), Identity (CompVis Dropout), Linear(4C -> C)]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += attn1(LN x); x += attn2(LN x, c); x += FF(LN x)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.gradient_checkpointing = False
        self.attn1 = CrossAttention(dim, dim, heads)           # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)   # cross-attention on the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, H*W, C), context: (B, 77, C_ctx)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """x + proj_out(blocks(proj_in(GN(x)))) with the pixels as tokens."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))                # (B, C, H, W)
        h = h.flatten(2).transpose(1, 2)              # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)                     # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)     # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 and padding 1: H -> ceil(H / 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize, then a 3x3 conv.

    Note: CompVis doubles the size (`F.interpolate(x, scale_factor=2)`), which
    crashes at the next concatenation when a down step rounded up (latent 28
    -> 14 -> 7 -> 4; 4 * 2 != 7). We resize to the size of the skip
    connection that comes next, as diffusers does with `upsample_size`. When
    that size is exactly double, both resizes are the same operation.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet block: hands each layer the input it needs (emb, context, size).

    Stored as a list so its layers are named `.0`, `.1`, `.2` like CompVis'
    `TimestepEmbedSequential(nn.Sequential)`.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps_theta(x, t, context): x (B, in, h, w), t (B,) int64, context (B, L, C_ctx) -> (B, out, h, w).

    The model runs in its parameters' dtype and on their device; x and
    context must have both. t may sit on any device (a CPU tensor from a
    Python loop, say): it is moved to the parameters' device. A 0-d t is
    used for every batch row. Any h and w work (see `Upsample`).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc  # CompVis: time_embed_dim = model_channels * 4

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, emb_dim, c_out, groups)

        def attn(c: int) -> SpatialTransformer:
            return SpatialTransformer(c, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Down path. `skip_channels` records what each input block hands to the up path.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch, ds = mc, 1  # ds: downsampling factor of the current level
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential([res(ch, ch), attn(ch), res(ch, ch)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute ResBlocks and transformer blocks in the backward pass (saves memory)."""
        return any(m.gradient_checkpointing for m in self.modules()
                   if isinstance(m, (ResBlock, BasicTransformerBlock)))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.gradient_checkpointing = bool(enabled)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        """Shape checks on Python ints only (nothing here syncs with the device)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise MeddapError(f"UNet input x has shape {tuple(x.shape)}; "
                              f"expected (B, {cfg.in_channels}, h, w) latents.")
        if t.shape != (x.shape[0],):
            raise MeddapError(f"UNet timesteps t have shape {tuple(t.shape)}; expected ({x.shape[0]},), one per "
                              "batch row, or a 0-d tensor.")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise MeddapError(f"UNet context has shape {tuple(context.shape)}; expected ({x.shape[0]}, L, "
                              f"{cfg.context_dim}) text-encoder states (SD v1: width 768; SD 2 uses 1024).")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, 4, h, w), t: (B,) or (), context: (B, 77, C_ctx)
        t = t.to(self.time_embed[0].weight.device)           # no copy when t is there already
        if t.ndim == 0:
            t = t.expand(x.shape[0])                          # (B,)
        self._check_inputs(x, t, context)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4*mc)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)                                   # (B, C_i, h_i, w_i)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)            # (B, C + C_skip, h_i, w_i)
            # An upsampler (last layer of a level) resizes to the next skip's size.
            next_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, next_size)
        return self.out(h)                                    # (B, out, h, w)
