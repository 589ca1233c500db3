"""The three SD v1 networks in one object, and loading them from the file people have.

Loading is a checked copy (STYLE.md habit 1): split the checkpoint by
prefix, strip it, `load_state_dict(strict=True)`. Only the text encoder goes
through a name map (meddap.models.text_encoder). The modules are first built
on the `meta` device (no memory), then each tensor is converted to the
requested dtype straight from the file and assigned, so loading to fp16
never holds an fp32 copy of the model.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from meddap.errors import MeddapError
from meddap.io import sha256_file
from meddap.models import checkpoint as ckpt
from meddap.models.config import CONFIGS, SDConfig, get_config
from meddap.models.text_encoder import TextEncoder, hf_to_open_clip, open_clip_to_hf
from meddap.models.unet import UNetModel
from meddap.models.vae import AutoencoderKL

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, path=None) -> torch.dtype:
    """torch.float32/float16/bfloat16, their names ("fp16", "bf16", ...), or None (float32).
    `path` (the file being loaded) is named in the error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    where = f"{path}: " if path is not None else ""
    raise MeddapError(f"{where}dtype {dtype!r} is not supported for Stable Diffusion weights; "
                      f"use float32, float16 or bfloat16 ({', '.join(DTYPES)}).")


class StableDiffusion(nn.Module):
    """SD v1: `.unet` (eps-prediction UNet), `.vae` (KL autoencoder), `.text_encoder` (CLIP)."""

    def __init__(self, config: SDConfig):
        super().__init__()
        self.config = config
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.text_encoder = TextEncoder(config.text)
        self.source_files: list[Path] = []      # weight files this model was loaded from
        self.lora_sha256: str | None = None     # SHA-256 of the adapter file loaded into .unet, if any

    @functools.cached_property
    def source_sha256(self) -> str | None:
        """SHA-256 of the loaded file; for a diffusers folder, of the lines "<file> <sha256>"
        of its three weight files. None for random weights. Computed on first use."""
        if not self.source_files:
            return None
        if len(self.source_files) == 1:
            return sha256_file(self.source_files[0])
        lines = "".join(f"{f.parent.name}/{f.name} {sha256_file(f)}\n" for f in self.source_files)
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def checkpoint_state_dict(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    """The model's tensors under SD v1 checkpoint names (the inverse of loading)."""
    out = {ckpt.PREFIXES["unet"] + k: v for k, v in sd.unet.state_dict().items()}
    out.update({ckpt.PREFIXES["vae"] + k: v for k, v in sd.vae.state_dict().items()})
    text = open_clip_to_hf(sd.text_encoder.state_dict())
    out.update({ckpt.PREFIXES["text_encoder"] + k: v for k, v in text.items()})
    return out


@functools.lru_cache(maxsize=None)
def expected_shapes(config: SDConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every required tensor of a config (built on `meta`, no memory)."""
    with torch.device("meta"):
        model = StableDiffusion(config)
    return {k: tuple(v.shape) for k, v in checkpoint_state_dict(model).items()}


# Tensors whose shapes tell the configs apart.
_SIGNATURE = (ckpt.PREFIXES["unet"] + "input_blocks.0.0.weight",
              ckpt.PREFIXES["vae"] + "encoder.conv_in.weight",
              ckpt.PREFIXES["text_encoder"] + "embeddings.token_embedding.weight")


def infer_config(tensors: dict[str, torch.Tensor], path) -> SDConfig:
    """The config (sd-v1.4 or tiny) whose shapes the file has, judged on `_SIGNATURE`."""
    ckpt.detect_family(tensors, path)
    for config in CONFIGS.values():
        shapes = expected_shapes(config)
        if all(k not in tensors or tuple(tensors[k].shape) == shapes[k] for k in _SIGNATURE):
            return config
    found = {k: list(tensors[k].shape) for k in _SIGNATURE if k in tensors}
    known = {c.name: [list(expected_shapes(c)[k]) for k in _SIGNATURE] for c in CONFIGS.values()}
    raise MeddapError(f"{path}: its shapes {found} match no known SD v1 config "
                      f"(expected shapes of {', '.join(_SIGNATURE)}: {known}).")


def inspect_checkpoint(path) -> tuple[ckpt.Checkpoint, SDConfig, ckpt.KeyReport]:
    """Read a file, infer its config and compare its keys (raises only for unreadable files or
    other model families)."""
    source = ckpt.open_checkpoint(path)
    config = infer_config(source.tensors, path)
    return source, config, ckpt.check_keys(source.tensors, expected_shapes(config), path)


def load_stable_diffusion(path, device="cpu", dtype=torch.float32) -> StableDiffusion:
    """Load SD v1 from `.ckpt`/`.pt`/`.safetensors` or a diffusers folder, strictly.

    The config (sd-v1.4 or tiny) comes from the tensor shapes. Schedule buffers,
    where present, are compared with meddap's schedule and any difference is
    warned about.
    """
    dtype = resolve_dtype(dtype, path)
    source, config, report = inspect_checkpoint(path)
    report.raise_for_errors()
    for difference in ckpt.compare_schedule(source.tensors):
        warnings.warn(f"{path}: schedule buffer {difference}; meddap samples with its own SD v1 schedule.")
    with torch.device("meta"):
        model = StableDiffusion(config)
    for name, module in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder)):
        prefix = ckpt.PREFIXES[name]
        keys = [k for k in expected_shapes(config) if k.startswith(prefix)]
        tensors = {k[len(prefix):]: source.take(k, device, dtype) for k in keys}
        if name == "text_encoder":
            tensors = hf_to_open_clip(tensors)
        module.load_state_dict(tensors, strict=True, assign=True)
    model.source_files = source.files
    return model.eval()


def build_stable_diffusion(config="sd-v1.4", device="cpu", dtype=torch.float32) -> StableDiffusion:
    """SD with random weights (each module's own initialisation) of a config."""
    dtype = resolve_dtype(dtype)
    with torch.device(device):
        model = StableDiffusion(get_config(config))
    return model.to(dtype).eval()


def save_stable_diffusion(sd: StableDiffusion, path, metadata: dict[str, str] | None = None) -> None:
    """Write an SD v1-layout `.safetensors` file (CompVis names, the model's dtype), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MeddapError(f"{path}: save_stable_diffusion writes .safetensors files; name it *.safetensors.")
    info = {"format": "pt", "meddap_config": sd.config.name, **(metadata or {})}
    ckpt.write_safetensors(path, checkpoint_state_dict(sd), info)
