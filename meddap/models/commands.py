"""Command-line entry points of meddap.models (registered by meddap.cli).

    meddap inspect-checkpoint PATH [--json]

reports, per network, tensor count, parameter count and dtypes, then the
missing, mis-shaped, unexpected and optional keys, the detected config and
how the file's schedule buffers compare with meddap's. Exit status: 0 when
the file would load, 1 when keys are missing, mis-shaped or unexpected, 2 when
the file cannot be read or is another model family (SD 2.x, SDXL, not SD).
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser(
        "inspect-checkpoint",
        help="check an SD v1 .ckpt/.safetensors file or diffusers folder without loading it",
        description="Report what an SD v1 checkpoint holds, per network, and whether it loads strictly.")
    p.add_argument("path", help="sd-v1-4.ckpt, a .safetensors conversion, or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=inspect_checkpoint_command)


def checkpoint_report(path) -> dict:
    """The inspect-checkpoint report as a dict (JSON-ready)."""
    from meddap.models import checkpoint as ckpt
    from meddap.models.stable_diffusion import inspect_checkpoint

    source, config, keys = inspect_checkpoint(path)
    report = {"path": str(path), "files": [str(f) for f in source.files], "family": "Stable Diffusion v1",
              "config": config.name}
    for component, prefix in ckpt.PREFIXES.items():
        tensors = [t for k, t in source.tensors.items() if k.startswith(prefix) and k not in ckpt.OPTIONAL]
        report[component] = {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors),
                             "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})}
    report["missing"] = [k for keys_ in keys.missing.values() for k in keys_]
    report["mismatched"] = keys.mismatched
    report["unexpected"] = keys.unexpected
    report["optional"] = keys.optional
    report["ignored_ema_copies"] = len(keys.ignored)
    present = [b for b in ckpt.SCHEDULE_BUFFERS if b in source.tensors]
    report["schedule"] = {"buffers_present": len(present),
                          "differences": ckpt.compare_schedule(source.tensors) if present else []}
    report["loads"] = not (report["missing"] or keys.mismatched or keys.unexpected)
    return report


def _print_text(r: dict) -> None:
    print(f"{r['path']}: {r['family']}, config {r['config']}")
    for c in ("unet", "vae", "text_encoder"):
        print(f"  {c:<13} {r[c]['tensors']:>5} tensors {r[c]['parameters']:>13,} parameters  "
              f"{', '.join(r[c]['dtypes'])}")
    for name in ("missing", "mismatched", "unexpected", "optional"):
        keys = r[name]
        print(f"  {name}: {len(keys)}" + (f"  first: {', '.join(keys[:5])}" if keys else ""))
    if r["ignored_ema_copies"]:
        print(f"  ignored: {r['ignored_ema_copies']} EMA weight copies (model_ema.*)")
    s = r["schedule"]
    if s["buffers_present"]:
        print(f"  schedule: {s['buffers_present']} buffers, "
              + ("equal to meddap's SD v1 schedule" if not s["differences"] else "; ".join(s["differences"])))
    print("  loads strictly" if r["loads"] else "  does NOT load: see missing / mismatched / unexpected")


def inspect_checkpoint_command(args) -> int:
    report = checkpoint_report(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if report["loads"] else 1
