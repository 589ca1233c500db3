"""Stable Diffusion v1's noise schedule: β_t, ᾱ_t and the forward noising q(z_t | z_0).

Index convention (the CompVis/diffusers one, used everywhere in meddap):
t ∈ {0, ..., 999} and t = 0 is the *first* noising step, so ᾱ_0 = 1 − β_0 < 1.
DDPM (Ho et al. 2020, arXiv 2006.11239) counts t = 1..T; its t is our t + 1.

The schedule is built once in float64 and cast only when used (improved-
diffusion's habit), so every sampler sees the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# SD v1's "scaled linear" betas: β_t = linspace(√β_start, √β_end, T)², from
# CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
# (linear_start: 0.00085, linear_end: 0.0120, timesteps: 1000) and
# ldm/modules/diffusionmodules/util.py make_beta_schedule("linear"), which
# squares a float64 linspace of the square roots (commit 21f890f).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000

# ldm/models/diffusion/ddpm.py register_schedule clips log(σ²) at log(1e-20)
# because the posterior variance is 0 at t = 0.
_POSTERIOR_LOG_VARIANCE_FLOOR = 1e-20


def _extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to broadcast against `like`: (B,) -> (B, 1, ..., 1), in like's dtype."""
    values = table.to(like.device)[t.to(like.device)]               # (B,) float64
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule; all tables are float64 of shape (T,).

    Symbols: betas = β_t, alphas_cumprod = ᾱ_t = ∏_{s≤t} (1 − β_s).
    """
    betas: torch.Tensor           # (T,) β_t
    alphas_cumprod: torch.Tensor  # (T,) ᾱ_t

    @classmethod
    def sd_v1(cls) -> "NoiseSchedule":
        """The schedule SD v1.4 was trained with (β from 0.00085 to 0.012, T = 1000)."""
        return cls.from_betas(sd_v1_betas())

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = betas.to(torch.float64)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) by reparameterisation:

            x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε        DDPM Eq. 4; MEDDAP Eq. 1 (z_t)

        x0, noise: (B, C, H, W); t: (B,) int64 in [0, T). Returns x0's dtype and device.
        """
        sqrt_ab = _extract(self.alphas_cumprod.sqrt(), t, x0)            # (B, 1, 1, 1)
        sqrt_one_minus_ab = _extract((1.0 - self.alphas_cumprod).sqrt(), t, x0)
        return sqrt_ab * x0 + sqrt_one_minus_ab * noise.to(x0.dtype)


def sd_v1_betas() -> torch.Tensor:
    """β_t = linspace(√0.00085, √0.012, 1000)², float64, shape (1000,)."""
    root = torch.linspace(SD_BETA_START ** 0.5, SD_BETA_END ** 0.5, SD_NUM_TRAIN_TIMESTEPS,
                          dtype=torch.float64)
    return root ** 2


def sd_checkpoint_buffers() -> dict[str, torch.Tensor]:
    """The schedule buffers SD v1 checkpoints store, with LatentDiffusion's names.

    Same formulas as CompVis `ldm/models/diffusion/ddpm.py` `DDPM.register_schedule`
    with v_posterior = 0: computed in float64, stored as float32 tensors of shape (1000,).
    With ᾱ_{t−1} the previous cumulative product (ᾱ_{−1} = 1):

        posterior_variance  β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)                 DDPM Eq. 7
        posterior_mean_coef1 = β_t √ᾱ_{t−1} / (1 − ᾱ_t)      (multiplies x_0)   DDPM Eq. 7
        posterior_mean_coef2 = (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) (multiplies x_t)   DDPM Eq. 7
    """
    betas = sd_v1_betas()
    alphas = 1.0 - betas
    ab = torch.cumprod(alphas, dim=0)                                   # ᾱ_t
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])  # ᾱ_{t−1}
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": ab.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ab).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ab).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped":
            posterior_variance.clamp(min=_POSTERIOR_LOG_VARIANCE_FLOOR).log(),
        "posterior_mean_coef1": betas * ab_prev.sqrt() / (1.0 - ab),
        "posterior_mean_coef2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
    }
    return {name: value.to(torch.float32) for name, value in buffers.items()}
