"""Pieces the UNet and the VAE share: multi-head attention through SDPA and a
GroupNorm with float32 statistics.

Both follow CompVis/stable-diffusion (commit 21f890f):
- attention is softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, arXiv
  1706.03762, Eq. 1), computed here by
  `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
  kernel (flash / memory-efficient / math) for the device and dtype;
- `GroupNorm32` is CompVis' `ldm.modules.diffusionmodules.util.GroupNorm32`:
  the statistics are computed in float32 and the result is cast back (on
  CUDA by torch's kernel itself, see the class).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head)) V per head, heads concatenated again.

    q: (B, T_q, C), k and v: (B, T_kv, C) with C = heads * d_head -> (B, T_q, C).
    The scale 1/sqrt(d_head) is SDPA's default, as in CompVis' CrossAttention
    (`self.scale = dim_head ** -0.5`).
    """
    B, T_q, C = q.shape
    T_kv = k.shape[1]
    d_head = C // heads
    q = q.view(B, T_q, heads, d_head).transpose(1, 2)    # (B, heads, T_q, d_head)
    k = k.view(B, T_kv, heads, d_head).transpose(1, 2)   # (B, heads, T_kv, d_head)
    v = v.view(B, T_kv, heads, d_head).transpose(1, 2)   # (B, heads, T_kv, d_head)
    out = F.scaled_dot_product_attention(q, k, v)        # (B, heads, T_q, d_head)
    return out.transpose(1, 2).reshape(B, T_q, C)        # (B, T_q, C)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018, arXiv 1803.08494, Eq. 1) with float32 statistics.

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias, with mean and
    variance over each group of C/groups channels and all pixels. The output
    has the input's dtype; in float32 this is exactly `nn.GroupNorm`. In fp16
    and bf16:
    - on the CPU the input, weight and bias are upcast and the result is cast
      back, as CompVis' GroupNorm32 does for the UNet;
    - on CUDA torch's own kernel runs on the fp16/bf16 tensors: it already
      accumulates the mean and variance and applies the affine map in float32
      (`acc_type` in ATen's native/cuda/group_norm_kernel.cu), rounding once to
      the input's dtype at the end, so it skips the four casts of the upcast.
      Note: the two roads may differ by rounding (a last bit), not by formula.

    Memory: on the CPU in fp16 and bf16 the upcast makes two full-size float32
    temporaries, x.float() and the float32 result, 4 bytes per value each beside
    the 2-byte input and output (see `meddap.models.vae.decode_peak_bytes`); on
    CUDA there are none.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.device.type == "cuda":
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)
