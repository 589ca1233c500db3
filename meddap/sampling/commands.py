"""`meddap sample`: text-to-image with a SD v1 checkpoint and an optional LoRA file.

Writes OUT/00000.png, OUT/00001.png, ... (each with its provenance in PNG text
chunks) and one line per image, with its SHA-256, in OUT/manifest.jsonl.
Re-running the same command resumes by the one resume rule of
`meddap.sampling.generation.write_images`: images that hash to their manifest
line and were made with the same settings are kept, the rest are generated;
an image made with other settings stops the run with an error.
"""
from __future__ import annotations

from meddap.io import json_sha256, output_folder
from meddap.outdir import FORCE_HELP, owned_output, torchrun_job_id
from meddap.sampling.generation import MANIFEST_NAME, SampleConfig
from meddap.settings import add_command, as_dict, from_args, validate


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def register(subparsers) -> None:
    """Add `meddap sample` to the `meddap` parser (flags derived from SampleConfig)."""
    p = add_command(subparsers, "sample", SampleConfig, run_sample,
                    help="generate images from a prompt (SD v1 + optional LoRA)",
                    description="Text-to-image with classifier-free guidance. Image k draws all its "
                                "noise from a generator seeded with image_seed(--seed, k), so it gets "
                                "the same noise whatever --batch-size. Re-run the same command to resume.")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run_sample(args) -> int:
    cfg = from_args(SampleConfig, args)
    with owned_output(cfg.out, "sample", json_sha256(as_dict(cfg)), args.force, torchrun_job_id()):
        return sample(cfg)


def sample(cfg: SampleConfig) -> int:
    """Run `meddap sample`; returns the exit code."""
    from meddap.sampling.generation import (ImageJob, check_model_files, load_model, 
                                            write_images)
    from meddap.sampling.text_to_image import image_seed

    validate(cfg)
    check_model_files(cfg.checkpoint, cfg.lora)       # before any weights load
    out = output_folder(cfg.out)
    sd = load_model(cfg.checkpoint, cfg.lora, cfg.device, cfg.dtype)
    jobs = [ImageJob(file=image_name(k), prompt=cfg.prompt, seed=image_seed(cfg.seed, k),
                     meta={"base_seed": cfg.seed, "index": k}) for k in range(cfg.n)]
    write_images(sd, cfg, jobs, out, desc="meddap sample", quiet=cfg.quiet)
    if not cfg.quiet:
        print(f"meddap sample: {cfg.n} images in {out}; manifest: {out / MANIFEST_NAME}")
    return 0
