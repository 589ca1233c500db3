"""Pretrain the `tiny` Stable Diffusion base shipped in weights/tiny/ (issue 8).

    python scripts/pretrain_tiny.py --threads 1 --work runs/pretrain_tiny --out weights/tiny/tiny-sd.safetensors

Trains on CPU (the shipped file: about 30 minutes on 2 shared cores); the stages
checkpoint into --work and a re-run resumes. The seed and the default settings
(PretrainConfig) with one thread reproduce the shipped file;
the settings are also stored in the file's safetensors metadata. See
meddap/pipeline/pretrain.py for the recipe.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from meddap.pipeline.pretrain import PretrainConfig, pretrain_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/pretrain_tiny", help="checkpoints and log.csv (resumable)")
    parser.add_argument("--out", default="weights/tiny/tiny-sd.safetensors")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    print(f"pretraining tiny SD with {cfg}")
    print(f"wrote {pretrain_tiny(cfg, args.work, args.out)}")


if __name__ == "__main__":
    main()
