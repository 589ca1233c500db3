"""Text-to-image with Stable Diffusion: prompts -> latents -> PNGs that carry their provenance.

1. Tokenise the prompts and the negative prompt ("" by default) as SD v1 does
   and encode them with the CLIP text encoder: c and c_u, (B, 77, D) each.
2. Draw z_T ~ N(0, I) of shape (B, 4, H/8, W/8) from each image's own generator.
3. Denoise with a sampler of `meddap.sampling.samplers` and classifier-free
   guidance (Ho & Salimans 2022, arXiv 2207.12598, Eq. 6, with w = s − 1):

       ε̂ = ε_θ(z_t, c_u) + s · (ε_θ(z_t, c) − ε_θ(z_t, c_u))

   one UNet call per step on the stacked batch [uncond; cond].
4. Decode: x = D(z_0 / 0.18215), mapped from [−1, 1] to 8-bit RGB.

Reproducibility: image k of a run with base seed S uses one CPU generator
seeded with `image_seed(S, k)`, for its initial noise first and then for its
sampler noise (DDPM, DDIM with η > 0). Noise is drawn in float32 on the CPU
and moved to the device, so neither the batch size nor the device changes
which noise an image gets (the network's arithmetic may still differ slightly
between devices and dtypes). Latents stay float32 between steps; the UNet,
VAE and text encoder run in the model's dtype.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from meddap.errors import MeddapError
from meddap.io import atomic_path
from meddap.progress import Progress
from meddap.sampling.samplers import Sampler, check_eta, check_num_steps, denoise, draw_noise

# Guidance scale s of the MEDDAP authors' generation (diffusers
# StableDiffusionPipeline default `guidance_scale=7.5`).
DEFAULT_GUIDANCE = 7.5
# Pixels per latent cell: SD v1's VAE downsamples three times (2^3).
LATENT_DOWNSAMPLING = 8
# image_seed(S, k) = (S · 1_000_003 + k) mod 2^63: a prime multiplier keeps the
# seed ranges of nearby base seeds apart for runs of up to a million images.
_SEED_MULTIPLIER = 1_000_003
_SEED_MODULUS = 2 ** 63


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image `index` in a run with `base_seed`: (base_seed·1_000_003 + index) mod 2^63."""
    return (int(base_seed) * _SEED_MULTIPLIER + int(index)) % _SEED_MODULUS


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image   # RGB, height x width
    metadata: dict       # provenance; see `generate`


def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) \
                or value < LATENT_DOWNSAMPLING or value % LATENT_DOWNSAMPLING:
            raise MeddapError(f"image {name} {value!r} is not a positive multiple of "
                              f"{LATENT_DOWNSAMPLING} pixels; use e.g. 224 or 512.")


def check_guidance(guidance: float) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) \
            or not math.isfinite(guidance):
        raise MeddapError(f"guidance scale {guidance!r} is not a finite number; "
                          f"use e.g. {DEFAULT_GUIDANCE} (1 = no guidance).")
    return float(guidance)


def encode_prompts(sd, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 77) on the CPU and the text encoder's hidden states (B, 77, D).

    Warns, naming the dropped words, for each prompt longer than SD's 77 tokens
    (start token + 75 BPE tokens + end token).
    """
    tokens, dropped = sd.text_encoder.tokenize_with_dropped(texts)    # (B, 77)
    for text, cut in zip(texts, dropped):
        if cut:
            warnings.warn(f"prompt {text!r} is longer than the text encoder's 77 tokens; "
                          f"these words were dropped: {cut!r}", stacklevel=3)
    with torch.no_grad():
        hidden = sd.text_encoder(tokens.to(sd.device))                 # (B, 77, D)
    return tokens, hidden


def guided_eps(unet, context_uncond: torch.Tensor, context_cond: torch.Tensor, guidance: float):
    """ε-function with classifier-free guidance for `denoise`.

    context_uncond, context_cond: (B, 77, D) in the UNet's dtype. Returns
    eps_fn(z, t): z (B, 4, h, w) float32, t (B,) -> ε̂ (B, 4, h, w) float32,
    ε̂ = ε_u + s (ε_c − ε_u) (Ho & Salimans 2022, Eq. 6 with w = s − 1).
    """
    context = torch.cat([context_uncond, context_cond])                 # (2B, 77, D)
    dtype = context.dtype

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z_in = torch.cat([z, z]).to(dtype)                              # (2B, 4, h, w)
        eps = unet(z_in, torch.cat([t, t]), context).float()            # (2B, 4, h, w)
        eps_u, eps_c = eps.chunk(2)                                     # (B, 4, h, w) each
        return eps_u + guidance * (eps_c - eps_u)

    return eps_fn


def latents_to_images(sd, z0: torch.Tensor) -> list[Image.Image]:
    """x = D(z_0 / scale) in [−1, 1] -> RGB uint8: round(255 · clamp((x + 1)/2, 0, 1))."""
    with torch.no_grad():
        x = sd.vae.decode((z0 / sd.vae.scale).to(sd.dtype)).float()   # (B, 3, H, W)
    x = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    arrays = x.permute(0, 2, 3, 1).cpu().numpy()                       # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]      # RGB


def generate(sd, prompts: list[str], seeds: list[int], *, negative_prompt: str = "",
             sampler: "str | Sampler" = "pndm", steps: int = 30, guidance: float = DEFAULT_GUIDANCE,
             height: int = 512, width: int = 512, eta: float = 0.0, batch_size: int = 1,
             show_progress: bool = True) -> list[GeneratedImage]:
    """One image per (prompt, seed), sampled in batches of `batch_size`.

    Defaults are the MEDDAP authors' generation settings (released code:
    diffusers' SD v1.4 pipeline, PNDM, 30 steps, guidance 7.5, 512 x 512).
    Image k depends only on its prompt, its seed and the settings, not on the
    batch it was sampled in. metadata: prompt, token_ids (77 ints),
    negative_prompt, seed, sampler, steps, guidance, eta, height, width,
    checkpoint_sha256 (`sd.source_sha256`), lora_sha256 (`sd.lora_sha256`, or None).
    """
    sampler = Sampler.parse(sampler)
    eta = check_eta(eta, sampler)
    check_num_steps(steps)
    check_size(height, width)
    guidance = check_guidance(guidance)
    if len(prompts) != len(seeds):
        raise MeddapError(f"got {len(prompts)} prompts and {len(seeds)} seeds; "
                          f"give one seed per prompt.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MeddapError(f"batch size {batch_size!r} must be a positive integer.")

    _, neg_hidden = encode_prompts(sd, [negative_prompt])               # (1, 77, D)
    latent_shape = (sd.config.unet.in_channels,                         # (4, H/8, W/8)
                    height // LATENT_DOWNSAMPLING, width // LATENT_DOWNSAMPLING)
    settings = {
        "negative_prompt": negative_prompt, "sampler": sampler.value, "steps": steps,
        "guidance": guidance, "eta": eta, "height": height, "width": width,
        "checkpoint_sha256": getattr(sd, "source_sha256", None),
        "lora_sha256": getattr(sd, "lora_sha256", None),
    }
    bar = Progress(total=len(prompts), desc="sampling", enabled=show_progress)
    out: list[GeneratedImage] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start:start + batch_size])
        batch_seeds = [int(s) for s in seeds[start:start + batch_size]]
        B = len(batch_prompts)
        tokens, cond = encode_prompts(sd, batch_prompts)               # (B, 77), (B, 77, D)
        uncond = neg_hidden.expand(B, -1, -1)                          # (B, 77, D)
        generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        z_T = draw_noise(torch.empty((B, *latent_shape), device=sd.device), generators)  # (B, 4, h, w)
        eps_fn = guided_eps(sd.unet, uncond, cond, guidance)
        z0 = denoise(eps_fn, z_T, scheduler=sampler, num_steps=steps, eta=eta,
                     generator=generators)                              # (B, 4, h, w) float32
        for k, image in enumerate(latents_to_images(sd, z0)):
            meta = {"prompt": batch_prompts[k], "token_ids": tokens[k].tolist(),
                    "seed": batch_seeds[k], **settings}
            out.append(GeneratedImage(image=image, metadata=meta))
        bar.update(B)
    bar.close()
    return out


def write_png(path: str | Path, image: Image.Image, metadata: dict) -> None:
    """Write `image` atomically with one text chunk per metadata key.

    Each value is stored JSON-encoded (strings in quotes), so `read_png_metadata`
    restores the exact types. Latin-1 text goes into tEXt chunks; other text
    (e.g. non-Latin prompts) into iTXt chunks, which PNG defines for UTF-8.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, json.dumps(value, ensure_ascii=False))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_metadata(path: str | Path) -> dict:
    """The metadata `write_png` stored in a PNG (other text chunks are skipped)."""
    try:
        with Image.open(path) as im:
            im.load()                                   # reads to the end: fails on a torn file
            chunks = dict(im.text)
    except (OSError, SyntaxError) as e:
        raise MeddapError(f"{path} is not a complete PNG file ({e}).") from e
    out = {}
    for key, text in chunks.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            continue
    return out
