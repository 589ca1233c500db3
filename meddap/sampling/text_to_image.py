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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from meddap.errors import MeddapError
from meddap.io import atomic_path, stream_seed
from meddap.lora.adapter import lora_layers
from meddap.progress import Progress
from meddap.sampling.generation import LATENT_DOWNSAMPLING, GenerationConfig
from meddap.sampling.samplers import Sampler, denoise, draw_noise
from meddap.settings import validate

# Longest excerpt of a prompt a warning quotes.
_QUOTE_CHARS = 80


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image `index` in a run with `base_seed`: meddap.io.stream_seed, the one
    per-stream seed rule, (base_seed·1_000_003 + index) mod 2^63."""
    return stream_seed(base_seed, index)


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image   # RGB, height x width
    metadata: dict       # provenance; see `TextToImage.__call__`


def _quote(text: str) -> str:
    """`text` as a warning quotes it: at most _QUOTE_CHARS characters, cut with an ellipsis."""
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS - 1] + "…"


def encode_prompts(sd, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 77) on the CPU and the text encoder's hidden states (B, 77, D).

    Warns, naming the dropped words, for each prompt longer than SD's 77 tokens
    (start token + 75 BPE tokens + end token).
    """
    tokens, dropped = sd.text_encoder.tokenize_with_dropped(texts)    # (B, 77)
    for text, cut in zip(texts, dropped):
        if cut:
            warnings.warn(f"prompt {_quote(text)!r} is longer than the text encoder's 77 tokens; "
                          f"these words were dropped: {_quote(cut)!r}", stacklevel=3)
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


class TextToImage:
    """Samples batches of images with one model and one checked GenerationConfig;
    the negative prompt is encoded once, here. `settings` is the provenance every
    image of it shares.

    cfg.compile (CUDA only): the UNet runs through torch.compile with CUDA graphs
    ("reduce-overhead"), specialised to the shapes of each batch size (dynamic=False),
    so the guided step replays one captured graph. Not run by the tests (they have
    no GPU); a compiled UNet may round differently from the eager one.
    """

    def __init__(self, sd, cfg: GenerationConfig):
        self.sd, self.cfg = sd, cfg
        self.unet = sd.unet
        if cfg.compile:
            if sd.device.type != "cuda":
                raise MeddapError(f"compile = true works on CUDA only; this model is on {sd.device} "
                                  f"(leave compile off there).")
            self.unet = torch.compile(sd.unet, mode="reduce-overhead", dynamic=False)
        _, self.negative_hidden = encode_prompts(sd, [cfg.negative])          # (1, 77, D)
        self.latent_shape = (sd.config.unet.in_channels,                     # (4, H/8, W/8)
                             cfg.height // LATENT_DOWNSAMPLING, cfg.width // LATENT_DOWNSAMPLING)
        self.settings = {
            "negative_prompt": cfg.negative, "sampler": cfg.sampler.value, "steps": cfg.steps,
            "guidance": float(cfg.guidance), "eta": float(cfg.eta), "height": cfg.height,
            "width": cfg.width, "checkpoint_sha256": sd.source_sha256, "lora_sha256": sd.lora_sha256,
            "lora_merged": any(m.merged for m in lora_layers(sd.unet).values()),
        }

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[GeneratedImage]:
        """One batch: image b from prompts[b] and a CPU generator seeded seeds[b].

        metadata: prompt, token_ids (77 ints), seed, and `settings`: negative_prompt,
        sampler, steps, guidance, eta, height, width, checkpoint_sha256
        (`sd.source_sha256`), lora_sha256 (`sd.lora_sha256`, None without adapters),
        lora_merged (whether the adapters are merged into the UNet's weights).
        """
        sd, cfg = self.sd, self.cfg
        seeds = [int(s) for s in seeds]
        B = len(prompts)
        tokens, cond = encode_prompts(sd, list(prompts))                    # (B, 77), (B, 77, D)
        uncond = self.negative_hidden.expand(B, -1, -1)                     # (B, 77, D)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        z_T = draw_noise(torch.empty((B, *self.latent_shape), device=sd.device), generators)  # (B, 4, h, w)
        eps_fn = guided_eps(self.unet, uncond, cond, float(cfg.guidance))
        z0 = denoise(eps_fn, z_T, scheduler=cfg.sampler, num_steps=cfg.steps, eta=float(cfg.eta),
                     generator=generators)                                  # (B, 4, h, w) float32
        return [GeneratedImage(image=image, metadata={"prompt": prompts[b], "token_ids": tokens[b].tolist(),
                                                      "seed": seeds[b], **self.settings})
                for b, image in enumerate(latents_to_images(sd, z0))]


def generate(sd, prompts: list[str], seeds: list[int], *, show_progress: bool = True,
             **settings) -> list[GeneratedImage]:
    """One image per (prompt, seed), sampled in batches of `batch_size`.

    settings: fields of GenerationConfig (sampler, steps, guidance, eta, height,
    width, negative, batch_size, compile), checked by its rules; those not given take
    its defaults, the MEDDAP authors' generation settings. `sampler` may be a name.
    `merge` is write_images' step: here sd is sampled as it is (LoRA training's
    validation images come through here from the model being trained).
    Image k's noise depends only on its seed, not on the batch it was sampled in;
    kernels may still round a row differently in a batch of another size, which
    can move a pixel by one grey level (generation.py's resume rule redoes whole
    chunks for this). metadata: see `TextToImage.__call__`.
    """
    if isinstance(settings.get("sampler"), str):
        settings["sampler"] = Sampler.parse(settings["sampler"])
    cfg = validate(GenerationConfig(**settings), lambda name: name)
    if len(prompts) != len(seeds):
        raise MeddapError(f"got {len(prompts)} prompts and {len(seeds)} seeds; "
                          f"give one seed per prompt.")
    t2i = TextToImage(sd, cfg)
    bar = Progress(total=len(prompts), desc="sampling", enabled=show_progress)
    out: list[GeneratedImage] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = t2i(list(prompts[start:start + cfg.batch_size]), list(seeds[start:start + cfg.batch_size]))
        out += batch
        bar.update(len(batch))
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
