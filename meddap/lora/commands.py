"""Command-line entry points of meddap.lora (registered by meddap.cli):

    meddap lora-info [FILE] [--config sd-v1.4] [--rank 4] [--alpha A] [--targets cross] [--json]
    meddap lora-convert IN OUT --to meddap|diffusers
    meddap train-lora --checkpoint PATH --data DIR_OR_SPLIT --out DIR [options] [--force]

The flags of train-lora are derived from `LoRARunConfig`, and lora-info's
--rank/--alpha/--targets from the same declarations (`AdapterConfig`).
train-lora holds its --out with `meddap.outdir.owned_output`.
"""
from __future__ import annotations

import json

from meddap.lora.adapter import AdapterConfig
from meddap.lora.train import LoRARunConfig, train_lora
from meddap.io import json_sha256
from meddap.outdir import FORCE_HELP, check_output_file, owned_output, torchrun_job_id
from meddap.settings import add_command, as_dict, from_args


def _info(args) -> int:
    import torch

    from meddap.lora.adapter import count_parameters, inject_lora, lora_layers
    from meddap.lora.files import read_lora_file
    from meddap.models.config import get_config
    from meddap.models.unet import UNetModel

    cfg = get_config(args.config)
    adapter = from_args(AdapterConfig, args)
    with torch.device("meta"):   # shapes only: no memory, no checkpoint needed
        unet = UNetModel(cfg.unet)
    if args.file:
        lora = read_lora_file(args.file)
        report = {"file": args.file, "format": lora.format.value, "rank": lora.rank,
                  "alpha": lora.alpha, "layers": len(lora.layers()),
                  "trainable": sum(t.numel() for t in lora.tensors.values()),
                  "metadata": lora.metadata}
        if lora.new_tokens is not None:             # text-tower rows: not UNet parameters
            report["new_tokens"] = {"ids": lora.new_tokens[0].tolist(), "width": lora.new_tokens[1].shape[1]}
    else:
        inject_lora(unet, adapter.rank, adapter.alpha, adapter.targets)
        layers = lora_layers(unet)
        report = {"rank": adapter.rank, "alpha": next(iter(layers.values())).alpha,
                  "targets": adapter.targets, "layers": len(layers),
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
        if "new_tokens" in report:
            print(f"  and {len(report['new_tokens']['ids'])} new-token embedding rows for the text tower "
                  f"({report['new_tokens']['width']} wide), token ids {report['new_tokens']['ids']}")
    else:
        print(f"{cfg.name}, targets {report['targets']}, rank {adapter.rank}, alpha {report['alpha']:g}: "
              f"{report['layers']} adapted linear layers")
    print(f"trainable parameters: {report['trainable']:,} of {report['unet_parameters']:,} in the UNet "
          f"({100 * report['ratio']:.4f}%)")
    return 0


def _convert(args) -> int:
    from meddap.lora.files import read_lora_file, write_lora_file

    check_output_file(args.output, "output", "lora.safetensors")
    lora = read_lora_file(args.input)
    write_lora_file(args.output, lora, args.to)
    print(f"{args.input} ({lora.format.value}, {len(lora.layers())} layers, rank {lora.rank}) -> "
          f"{args.output} ({args.to})")
    return 0


def _train(args) -> int:
    cfg = from_args(LoRARunConfig, args, show_progress=not args.quiet)
    with owned_output(cfg.out, "train-lora", json_sha256(as_dict(cfg)), args.force, torchrun_job_id()):
        path = train_lora(cfg)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = add_command(subparsers, "lora-info", AdapterConfig, _info,
                    help="count LoRA parameters, or describe an adapter file")
    p.add_argument("file", nargs="?", help="an adapter file (meddap or diffusers format) to describe")
    p.add_argument("--config", default="sd-v1.4", help="model config: sd-v1.4 (default) or tiny")
    p.add_argument("--json", action="store_true", help="print JSON (keys trainable, unet_parameters, ratio, ...)")

    p = subparsers.add_parser("lora-convert", help="convert an adapter file between meddap and diffusers formats")
    p.add_argument("input", help="adapter file (format detected)")
    p.add_argument("output", help="file to write (atomically)")
    p.add_argument("--to", required=True, choices=["meddap", "diffusers"], help="output format")
    p.set_defaults(func=_convert)

    p = add_command(subparsers, "train-lora", LoRARunConfig, _train,
                    help="fine-tune USLoRA adapters on labelled images (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
