"""`meddap sample`: text-to-image with a SD v1 checkpoint and an optional LoRA file.

Writes OUT/00000.png, OUT/00001.png, ... (each with its provenance in PNG text
chunks) and one line per image in OUT/manifest.jsonl. Re-running the same
command resumes: complete PNGs made with the same settings are kept, the rest
are generated; a PNG made with other settings stops the run with an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from meddap.errors import MeddapError

MANIFEST_NAME = "manifest.jsonl"
DTYPES = ("fp32", "fp16", "bf16")
# Settings an existing PNG must share with the current run to be kept on resume.
_RESUME_KEYS = ("prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "eta",
                "height", "width", "checkpoint_sha256", "lora_sha256")


@dataclass(frozen=True)
class SampleConfig:
    """One `meddap sample` run. Defaults are the MEDDAP authors' generation settings
    (released code: diffusers SD v1.4 pipeline, PNDM, 30 steps, guidance 7.5,
    512 x 512; they ran fp16, we default to fp32 for reproducibility)."""
    checkpoint: str
    prompt: str
    out: str
    lora: str | None = None
    negative: str = ""
    n: int = 1
    steps: int = 30
    sampler: str = "pndm"
    guidance: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 0
    batch_size: int = 1
    device: str | None = None     # None: "cuda" when available, else "cpu"
    dtype: str = "fp32"
    quiet: bool = False


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def register(subparsers) -> None:
    """Add `meddap sample` to the `meddap` parser."""
    d = SampleConfig("", "", "")
    p = subparsers.add_parser(
        "sample", help="generate images from a prompt (SD v1 + optional LoRA)",
        description="Text-to-image with classifier-free guidance. Image k draws all its noise "
                    "from a generator seeded with image_seed(--seed, k), so it gets the same "
                    "noise whatever --batch-size. Re-run the same command to resume.")
    p.add_argument("--checkpoint", required=True, help="SD v1 .ckpt/.safetensors file or diffusers folder")
    p.add_argument("--lora", default=None, help="LoRA adapter file (meddap or diffusers format)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=d.negative, help='negative prompt (default "": SD\'s unconditional prompt)')
    p.add_argument("--n", type=int, default=d.n, help="number of images (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps, 1..1000 (default %(default)s)")
    p.add_argument("--sampler", default=d.sampler, help="pndm | ddim | ddpm (default %(default)s)")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help="classifier-free guidance scale s (default %(default)s; 1 = none)")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta (default %(default)s; ddim only)")
    p.add_argument("--height", type=int, default=d.height, help="multiple of 8 (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="multiple of 8 (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, dest="batch_size",
                   help="images per UNet call (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument("--device", default=None, help='e.g. "cuda", "cuda:1", "cpu" (default: cuda if available)')
    p.add_argument("--dtype", default=d.dtype, help="fp32 | fp16 | bf16 (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def run_sample(args) -> int:
    cfg = SampleConfig(**{k: getattr(args, k) for k in SampleConfig.__dataclass_fields__})
    return sample(cfg)


def _check(cfg: SampleConfig) -> None:
    """Reject bad settings before loading any weights."""
    from meddap.sampling.samplers import Sampler, check_eta, check_num_steps
    from meddap.sampling.text_to_image import check_guidance, check_size
    check_eta(cfg.eta, Sampler.parse(cfg.sampler))
    check_num_steps(cfg.steps)
    check_size(cfg.height, cfg.width)
    check_guidance(cfg.guidance)
    if cfg.dtype not in DTYPES:
        raise MeddapError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}.")
    for name, value in (("--n", cfg.n), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise MeddapError(f"{name} {value} must be at least 1.")
    if not Path(cfg.checkpoint).exists():
        raise MeddapError(f"checkpoint {cfg.checkpoint} does not exist; give a SD v1 "
                          f".ckpt/.safetensors file or a diffusers folder.")
    if cfg.lora is not None and not Path(cfg.lora).is_file():
        raise MeddapError(f"LoRA file {cfg.lora} does not exist.")
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MeddapError(f"cannot create output folder {out}: {e.strerror}; "
                          f"choose a folder you can write to.") from e
    if not out.is_dir() or not os.access(out, os.W_OK):
        raise MeddapError(f"output folder {out} is not writable; choose a folder you can write to.")


def _done_images(cfg: SampleConfig, expected: dict[int, dict]) -> dict[int, dict]:
    """Complete PNGs already in the output folder, by index; other settings -> error."""
    from meddap.sampling.text_to_image import read_png_metadata
    done = {}
    for k, want in expected.items():
        path = Path(cfg.out) / image_name(k)
        if not path.exists():
            continue
        try:
            meta = read_png_metadata(path)
        except MeddapError:
            continue                                    # torn or foreign file: make it again
        diff = [key for key in _RESUME_KEYS if meta.get(key) != want[key]]
        if diff:
            key = diff[0]
            raise MeddapError(f"{path} was made with other settings ({key}: {meta.get(key)!r}, "
                              f"this run: {want[key]!r}); use another --out folder or delete it.")
        done[k] = meta
    return done


def sample(cfg: SampleConfig) -> int:
    """Run `meddap sample`; returns the exit code."""
    _check(cfg)
    import torch

    from meddap.io import append_jsonl, read_jsonl, sha256_file
    from meddap.models.stable_diffusion import load_stable_diffusion
    from meddap.progress import Progress
    from meddap.sampling.samplers import Sampler
    from meddap.sampling.text_to_image import generate, image_seed, write_png

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise MeddapError(f"--device {device}: no CUDA device is available here; use --device cpu.")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    sd = load_stable_diffusion(cfg.checkpoint, device=device, dtype=dtype)
    if cfg.lora is not None:
        from meddap.lora import load_lora
        load_lora(sd.unet, cfg.lora)
        sd.lora_sha256 = sha256_file(cfg.lora)

    out = Path(cfg.out)
    seeds = [image_seed(cfg.seed, k) for k in range(cfg.n)]
    common = {"prompt": cfg.prompt, "negative_prompt": cfg.negative,
              "sampler": Sampler.parse(cfg.sampler).value, "steps": cfg.steps,
              "guidance": float(cfg.guidance), "eta": float(cfg.eta), "height": cfg.height,
              "width": cfg.width, "checkpoint_sha256": sd.source_sha256,
              "lora_sha256": getattr(sd, "lora_sha256", None)}
    expected = {k: {**common, "seed": s} for k, s in enumerate(seeds)}
    done = _done_images(cfg, expected)

    manifest = out / MANIFEST_NAME
    listed = {row.get("file") for row in read_jsonl(manifest)}
    for k, meta in sorted(done.items()):              # PNG written, then killed before its line
        if image_name(k) not in listed:
            append_jsonl(manifest, {"file": image_name(k), **meta})

    # Batches are the fixed chunks [0, B), [B, 2B), ... of the image indices, and a
    # chunk with any missing image is sampled whole (only missing files are written):
    # float32 kernels may round a row differently in another batch, so this keeps a
    # resumed image bitwise equal to what the uninterrupted run would have written.
    pending = [k for k in range(cfg.n) if k not in done]
    bar = Progress(total=cfg.n, initial=cfg.n - len(pending), desc="meddap sample",
                   enabled=not cfg.quiet)
    for start in range(0, cfg.n, cfg.batch_size):
        chunk = list(range(start, min(start + cfg.batch_size, cfg.n)))
        if all(k in done for k in chunk):
            continue
        images = generate(sd, [cfg.prompt] * len(chunk), [seeds[k] for k in chunk],
                          negative_prompt=cfg.negative, sampler=cfg.sampler, steps=cfg.steps,
                          guidance=cfg.guidance, height=cfg.height, width=cfg.width,
                          eta=cfg.eta, batch_size=cfg.batch_size, show_progress=False)
        missing = [(k, result) for k, result in zip(chunk, images) if k not in done]
        for k, result in missing:
            meta = {**result.metadata, "base_seed": cfg.seed, "index": k}
            write_png(out / image_name(k), result.image, meta)
            append_jsonl(manifest, {"file": image_name(k), **meta})
        bar.update(len(missing))
    bar.close()
    if not cfg.quiet:
        print(f"meddap sample: {cfg.n} images in {out} ({cfg.n - len(pending)} kept from an "
              f"earlier run); manifest: {manifest}")
    return 0
