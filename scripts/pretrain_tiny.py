"""Pretrain the `tiny` Stable Diffusion base shipped in weights/tiny/.

    python scripts/pretrain_tiny.py --threads 2 --work runs/pretrain_tiny --out weights/tiny/tiny-sd.safetensors
    python scripts/pretrain_tiny.py --redraw-tokens-of STAGE3.safetensors --out OUT.safetensors

Trains on CPU (the shipped file: 20 minutes on 2 AVX-512 cores, `--threads 2`;
weights/tiny/README.md has the run's command, duration and losses); the stages
checkpoint into --work and a re-run resumes. The seed and the default settings
(PretrainConfig) are the shipped file's recipe (float rounding differs between CPUs
and thread counts, so the bytes need not match); the settings are also stored in the
file's safetensors metadata. See meddap/pretrain/train.py for the recipe. The run
prints the autoencoder's PSNR and channel spread on 32 held-out phantoms
(meddap/pretrain/evaluate.py) and stores them in the file's metadata.

--redraw-tokens-of runs the optional stage 3b alone (the unseen token rows; train.py
says what it does to the demo, and why the shipped file is without it) on a file that
stages 1-3 made, such as the shipped one; its `pretrain_*` metadata must match the
settings that fix the stage-3 captions.
"""
from __future__ import annotations

import argparse
import sys

import torch

from meddap import settings
from meddap.errors import MeddapError
from meddap.pretrain.train import PretrainConfig, pretrain_tiny, redraw_file_token_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/pretrain_tiny", help="checkpoints and log.csv (resumable)")
    parser.add_argument("--out", default="weights/tiny/tiny-sd.safetensors")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--redraw-tokens-of", metavar="FILE", default=None,
                        help="run stage 3b alone on FILE (a stage-3 tiny base) and write --out")
    settings.add_arguments(parser, PretrainConfig)
    args = parser.parse_args()
    try:
        cfg = settings.from_args(PretrainConfig, args)
    except MeddapError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.redraw_tokens_of:
            print(f"stage 3b on {args.redraw_tokens_of} with {cfg}")
            print(f"wrote {redraw_file_token_rows(cfg, args.redraw_tokens_of, args.out)}")
        else:
            print(f"pretraining tiny SD with {cfg}")
            print(f"wrote {pretrain_tiny(cfg, args.work, args.out)}")
    except MeddapError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
