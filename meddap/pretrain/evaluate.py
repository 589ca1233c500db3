"""How well the tiny base's autoencoder draws phantom ultrasound it never saw.

The VAE is pretrained on `shapes` only; this file measures it on a fixed set of
held-out phantom B-mode images (`meddap.data.phantom`, site a, 64 px, the demo's
domain; masks excluded), as grey images replicated to RGB:

    PSNR   = 10 log10(1 / MSE),  MSE over pixels and channels, images in [0, 1]
    spread = mean over pixels of (max - min over R, G, B)       (0 for grey)

with x_hat = D(mean of q(z|x)) clipped to [0, 1]. The reference is the best
smooth image a 1/64-size latent can hold without learning anything: the means
of 8 x 8 blocks upsampled bilinearly (`block_mean_reference`). Speckle itself
cannot be reproduced from an 8 x 8 x 4 latent, so even a good VAE ends up
near the reference (a trial on the grey-field domain reached it, 18.7 dB).

The UNet is probed on the same phantoms' latents z_0 (posterior mean, scaled):
can it predict the per-image mean of the noise it is given? With
z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps and bar-x the spatial mean per image
and channel,

    noise-mean error = rms(bar-eps_hat - bar-eps) / rms(bar-eps)     (`noise_mean_error`)

is 1 for a UNet blind to that mean (it predicts none of it) and 0 for a perfect
one. Sampling turns an error d in it into an error d sqrt(1 - ab_t) / sqrt(ab_t)
in the image's mean latent (about 8 d at t = 901), which the decoder draws as a
colour cast, so a base that cannot track it gives tinted samples whatever the
adapter learns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from meddap.data import phantom
from meddap.data.datasets import load_rgb

PROBE_SEED = 20_240_325              # a phantom seed no demo, test or pretraining run writes with
PROBE_IMAGES = 32                    # 11 benign, 11 malignant, 10 normal
PROBE_SIZE = 64
NOISE_PROBE_TIMESTEPS = (200, 600, 900)   # early, middle and late in the schedule


def probe_phantoms(n: int = PROBE_IMAGES, size: int = PROBE_SIZE) -> np.ndarray:
    """The fixed held-out phantoms: (n, size, size) uint8, classes in turn."""
    probe, images = phantom.PROBES[phantom.Site.A], []
    for k in range(n):
        label = phantom.CLASSES[k % len(phantom.CLASSES)]
        rng = phantom.image_rng(PROBE_SEED, phantom.Site.A, label, k)
        images.append(phantom.simulate(rng, label, probe, size)[0])
    return np.stack(images)


@dataclass(frozen=True)
class Reconstruction:
    psnr_db: float                   # over all probe images at once
    spread: float                    # mean channel spread of the reconstructions


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / F.mse_loss(x.double(), y.double())))


@torch.no_grad()
def vae_reconstruction(vae, grey: np.ndarray) -> Reconstruction:
    """PSNR and channel spread of encode -> decode (posterior mean) on grey (N, H, W) uint8."""
    param = next(vae.parameters())
    x = torch.from_numpy(grey).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)   # (N, 3, H, W) [0, 1]
    mean, _ = vae.encode((2 * x - 1).to(param))
    x_hat = ((vae.decode(mean).float().cpu() + 1) / 2).clamp(0, 1)                    # (N, 3, H, W)
    return Reconstruction(psnr_db=_psnr(x_hat, x), spread=channel_spread(x_hat))


def channel_spread(x: torch.Tensor) -> float:
    """Mean over pixels of (max - min over R, G, B) of (N, 3, H, W) images in [0, 1]: 0 for grey."""
    return (x.amax(1) - x.amin(1)).double().mean().item()


def read_images(paths) -> torch.Tensor:
    """8-bit image files, read by `load_rgb` as every stage reads them: (N, 3, H, W) float64 in [0, 1]."""
    x = torch.from_numpy(np.stack([np.asarray(load_rgb(p)) for p in paths]))           # (N, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).double() / 255


def block_mean_reference(grey: np.ndarray, block: int = 8) -> float:
    """PSNR of 8 x 8 block means upsampled bilinearly: the smooth-reconstruction reference."""
    x = torch.from_numpy(grey).float().div(255).unsqueeze(1)                          # (N, 1, H, W)
    coarse = F.avg_pool2d(x, block)                                                   # (N, 1, H/8, W/8)
    return _psnr(F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False), x)


@torch.no_grad()
def noise_mean_error(sd, grey: np.ndarray, timesteps=NOISE_PROBE_TIMESTEPS, seed: int = 0) -> float:
    """The noise-mean error (module docstring) of sd's UNet on grey (N, H, W) uint8 images,
    empty caption, pooled over `timesteps` (one noise draw per image and timestep)."""
    from meddap.sampling.schedule import NoiseSchedule

    param = next(sd.unet.parameters())
    x = torch.from_numpy(grey).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)  # (N, 3, H, W)
    z0 = sd.vae.scale * sd.vae.encode(x.to(param))[0].float()                               # (N, 4, h, w)
    context = sd.text_encoder(sd.text_encoder.tokenize([""]).to(param.device))              # (1, 77, D)
    schedule, gen = NoiseSchedule.sd_v1(), torch.Generator().manual_seed(seed)
    err, ref = [], []
    for step in timesteps:
        t = torch.full((z0.shape[0],), step, dtype=torch.long)
        eps = torch.randn(z0.shape, generator=gen).to(z0)                                    # (N, 4, h, w)
        z_t = schedule.q_sample(z0.cpu(), t, eps.cpu()).to(param)
        eps_hat = sd.unet(z_t, t.to(param.device), context.expand(z0.shape[0], -1, -1)).float()
        err.append(eps_hat.mean((2, 3)) - eps.mean((2, 3)))                                 # (N, 4)
        ref.append(eps.mean((2, 3)))
    return float(torch.cat(err).pow(2).mean().sqrt() / torch.cat(ref).pow(2).mean().sqrt())
