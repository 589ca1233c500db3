"""Command-line entry points of meddap.lora (registered by meddap.cli):

    meddap lora-info [FILE] [--config sd-v1.4] [--rank 4] [--alpha A] [--targets cross] [--json]
    meddap lora-convert IN OUT --to meddap|diffusers
    meddap train-lora --checkpoint PATH --data DIR_OR_SPLIT --out DIR [options]
"""
from __future__ import annotations

import argparse
import json

from meddap.errors import MeddapError


def _targets(values: list[str]):
    """`--targets cross`, `--targets all`, or `--targets PATTERN [PATTERN ...]`."""
    return values[0] if len(values) == 1 and values[0] in ("cross", "all") else tuple(values)


def _info(args) -> int:
    import torch

    from meddap.lora.adapter import count_parameters, inject_lora, lora_layers
    from meddap.lora.files import read_lora_file
    from meddap.models.config import get_config
    from meddap.models.unet import UNetModel

    cfg = get_config(args.config)
    with torch.device("meta"):   # shapes only: no memory, no checkpoint needed
        unet = UNetModel(cfg.unet)
    if args.file:
        lora = read_lora_file(args.file)
        report = {"file": args.file, "format": lora.format.value, "rank": lora.rank,
                  "alpha": lora.alpha, "layers": len(lora.layers()),
                  "trainable": sum(t.numel() for t in lora.tensors.values()),
                  "metadata": lora.metadata}
    else:
        inject_lora(unet, args.rank, args.alpha, _targets(args.targets))
        layers = lora_layers(unet)
        report = {"rank": args.rank, "alpha": next(iter(layers.values())).alpha,
                  "targets": _targets(args.targets), "layers": len(layers),
                  "trainable": count_parameters(unet)[0]}
    report["config"] = cfg.name
    report["unet_parameters"] = count_parameters(unet)[1]
    report["ratio"] = report["trainable"] / report["unet_parameters"]
    if args.json:
        print(json.dumps(report, indent=2, default=list))
        return 0
    if args.file:
        print(f"{args.file}: {report['format']} format, rank {report['rank']}, alpha {report['alpha']:g}, "
              f"{report['layers']} adapted linear layers")
        for k, v in report["metadata"].items():
            print(f"  {k} = {v}")
    else:
        print(f"{cfg.name}, targets {report['targets']}, rank {args.rank}, alpha {report['alpha']:g}: "
              f"{report['layers']} adapted linear layers")
    print(f"trainable parameters: {report['trainable']:,} of {report['unet_parameters']:,} in the UNet "
          f"({100 * report['ratio']:.4f}%)")
    return 0


def _convert(args) -> int:
    from meddap.lora.files import read_lora_file, write_lora_file

    lora = read_lora_file(args.input)
    write_lora_file(args.output, lora, args.to)
    print(f"{args.input} ({lora.format.value}, {len(lora.layers())} layers, rank {lora.rank}) -> "
          f"{args.output} ({args.to})")
    return 0


def _train(args) -> int:
    import torch

    from meddap.lora.train import LoRARunConfig, MixedPrecision, train_lora

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = str(torch.device(device))
    except RuntimeError:
        raise MeddapError(f"--device {args.device!r} is not a torch device; use e.g. cpu, cuda, cuda:1.") from None
    cfg = LoRARunConfig(
        checkpoint=args.checkpoint, data=args.data, out=args.out, rank=args.rank, alpha=args.alpha,
        targets=_targets(args.targets), lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, resolution=args.resolution, seed=args.seed, device=device,
        mixed_precision=MixedPrecision(args.mixed_precision),
        gradient_checkpointing=args.gradient_checkpointing, cache_latents=args.cache_latents,
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        validation_prompts=tuple(args.validation_prompts or ()), validation_steps=args.validation_steps,
        as_released=args.as_released, show_progress=not args.quiet)
    path = train_lora(cfg)
    print(f"wrote {path}")
    return 0


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (paper: 4)")
    p.add_argument("--alpha", type=float, default=None,
                   help="LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank, scale 1)")
    p.add_argument("--targets", nargs="+", default=["cross"], metavar="TARGET",
                   help="'cross' (paper: attn2 q/k/v/out), 'all' (attn1 + attn2, the authors' released "
                        "weights) or fnmatch patterns over layer names, e.g. '*.attn2.to_k'")


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser("lora-info", help="count LoRA parameters, or describe an adapter file")
    p.add_argument("file", nargs="?", help="an adapter file (meddap or diffusers format) to describe")
    p.add_argument("--config", default="sd-v1.4", help="model config: sd-v1.4 (default) or tiny")
    _add_adapter_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (keys trainable, unet_parameters, ratio, ...)")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("lora-convert", help="convert an adapter file between meddap and diffusers formats")
    p.add_argument("input", help="adapter file (format detected)")
    p.add_argument("output", help="file to write (atomically)")
    p.add_argument("--to", required=True, choices=["meddap", "diffusers"], help="output format")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("train-lora", help="fine-tune USLoRA adapters on labelled images (resumable)")
    p.add_argument("--checkpoint", required=True, help="SD v1 checkpoint (.ckpt/.safetensors/diffusers folder)")
    p.add_argument("--data", required=True, help="class-folder dataset or SPLIT.json:FOLD:PART")
    p.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    _add_adapter_args(p)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (paper: 1e-4)")
    p.add_argument("--epochs", type=int, default=100, help="passes over the data (paper: 100)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument("--batch-size", type=int, default=1, help="images per step (paper: 1)")
    p.add_argument("--resolution", type=int, default=224, help="training size in pixels (paper: 224)")
    p.add_argument("--seed", type=int, default=42, help="seed of init, data order and noise (released: 42)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                   help="base model dtype on GPU; adapters stay float32 (released: fp16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode each image once (center crop, both flips): fixes the crop, keeps flips "
                        "and posterior sampling random")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write a resumable state every N steps")
    p.add_argument("--validate-every", type=int, default=0, help="sample validation images every N steps (0: off)")
    p.add_argument("--validation-prompts", nargs="+", default=None,
                   help="prompts for validation images (default: each class's training prompt)")
    p.add_argument("--validation-steps", type=int, default=30, help="sampler steps for validation images")
    p.add_argument("--as-released", action="store_true",
                   help="use the released training captions ('an ultrasound photo of X tumor in breast')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
