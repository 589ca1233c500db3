"""The `meddap` command: each area of the package adds its own sub-commands
(`register` in meddap/<area>/commands.py).

Every error is one line on stderr, never a traceback (`meddap --debug ...`
shows it):
    MeddapError (bad input, a broken file)      "meddap CMD: error: ...", exit 2
    OSError (the user's files: permissions,     "meddap CMD: error: STRERROR: FILE", exit 2
      a full disk, a directory given as a file)
    any other exception (a bug in meddap)       "meddap CMD: internal error: ...", exit 3
    Ctrl-C                                      "meddap CMD: interrupted; ...", exit 130
Warnings are one line too: "meddap CMD: warning: ...".
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings

from meddap import bench
from meddap.classify import commands as classify
from meddap.data import commands as data
from meddap.device import keep_freed_memory
from meddap.errors import MeddapError
from meddap.fid import commands as fid
from meddap.fid import memorization
from meddap.lora import commands as lora
from meddap.models import commands as models
from meddap.pipeline import commands as pipeline
from meddap.sampling import commands as sampling

EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddap",
        description="MEDDAP: Stable Diffusion v1.4 + USLoRA dataset enhancement (arXiv 2403.16335).")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show Python's traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (pipeline, models, sampling, lora, data, fid, memorization, classify, bench):
        area.register(sub)
    return parser


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _os_error(e: OSError) -> str:
    """An OSError as "STRERROR: FILE" (and " -> FILE2" for a rename)."""
    text = e.strerror or _first_line(str(e)) or type(e).__name__
    if e.filename is not None:
        text += f": {e.filename}"
    if e.filename2 is not None:
        text += f" -> {e.filename2}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    name = f"meddap {args.command}"
    shown_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{name}: warning: {_first_line(str(message))}\n"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, MeddapError):
            print(f"{name}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(e, OSError):                  # about the user's files, not a bug
            print(f"{name}: error: {_os_error(e)}", file=sys.stderr)
            return EXIT_ERROR
        debug = shlex.join(["meddap", "--debug", *(a for a in argv if a != "--debug")])
        print(f"{name}: internal error: {type(e).__name__}: {_first_line(str(e))}; this is a bug in "
              f"meddap: please report it with the output of `{debug}`", file=sys.stderr)
        return EXIT_BUG
    finally:
        warnings.formatwarning = shown_format


if __name__ == "__main__":
    sys.exit(main())
