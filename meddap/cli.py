"""The `meddap` command: each area of the package adds its own sub-commands
(`register` in meddap/<area>/commands.py).
"""
from __future__ import annotations

import argparse
import sys

from meddap.classify import commands as classify
from meddap.data import commands as data
from meddap.errors import MeddapError
from meddap.fid import commands as fid
from meddap.lora import commands as lora
from meddap.models import commands as models
from meddap.pipeline import commands as pipeline
from meddap.sampling import commands as sampling


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddap",
        description="MEDDAP: Stable Diffusion v1.4 + USLoRA dataset enhancement (arXiv 2403.16335).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (pipeline, models, sampling, lora, data, fid, classify):
        area.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MeddapError as e:
        print(f"meddap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meddap {args.command}: interrupted; re-run the same command to resume.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
