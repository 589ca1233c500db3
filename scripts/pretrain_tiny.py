"""Pretrain the `tiny` Stable Diffusion base shipped in weights/tiny/.

    python scripts/pretrain_tiny.py --threads 2 --work runs/pretrain_tiny --out weights/tiny/tiny-sd.safetensors

Trains on CPU (the shipped file: 20 minutes on 2 AVX-512 cores, `--threads 2`;
weights/tiny/README.md has the run's command, duration and losses); the stages
checkpoint into --work and a re-run resumes. The seed and the default settings
(PretrainConfig) are the shipped file's recipe (float rounding differs between CPUs
and thread counts, so the bytes need not match); the settings are also stored in the
file's safetensors metadata. See meddap/pretrain/train.py for the recipe. The run
prints the autoencoder's PSNR and channel spread on 32 held-out phantoms
(meddap/pretrain/evaluate.py) and stores them in the file's metadata.
"""
from __future__ import annotations

import argparse

import torch

from meddap import settings
from meddap.errors import MeddapError
from meddap.pretrain.train import PretrainConfig, pretrain_tiny


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/pretrain_tiny", help="checkpoints and log.csv (resumable)")
    parser.add_argument("--out", default="weights/tiny/tiny-sd.safetensors")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    settings.add_arguments(parser, PretrainConfig)
    args = parser.parse_args()
    try:
        cfg = settings.from_args(PretrainConfig, args)
    except MeddapError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"pretraining tiny SD with {cfg}")
    print(f"wrote {pretrain_tiny(cfg, args.work, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
