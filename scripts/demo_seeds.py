"""The demo's adaptation check at several seeds: one `meddap run` per seed, then a table.

    python scripts/demo_seeds.py [CONFIG] --work DIR [--seeds 0 1 2] [--set SECTION.KEY=VALUE ...]

CONFIG is a TOML run config or a shipped name (default: demo-fast). Seed s sets
`[run] seed` and `[lora] seed` to s (the rule behind README's three-seed
figures); each --set then overrides one key, VALUE written as in TOML
(`--set classify.size=32`, `--set 'lora.targets=["*.attn2.*"]'`). Every derived
config goes through the run config's own checks, so a bad key or value is the
usual "[section] key" error, raised before any run starts.

Seed s runs in DIR/seed<s>/ (re-running resumes, as `meddap run` does). The
table gives, per seed, the real-only classifiers' accuracy on the adapted and
unadapted check images, the adapted samples' mean channel spread (0 for grey;
nan for a run whose summary predates it), the adapted confusion matrix (rows:
true class) and the wall time of this invocation's run (a resumed seed shows
only what was left). DIR/seeds.json holds the same rows. The seeds run one after another in
this process, so the stage banners' "into the run" times count from the
script's start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from meddap.errors import MeddapError
from meddap.io import write_json_atomic
from meddap.pipeline.config import RunConfig, config_from_dict, read_config_toml

SEEDED = (("run", "seed"), ("lora", "seed"))      # the keys a seed sets


def parse_set(item: str) -> tuple[str, str, object]:
    """'section.key=VALUE' -> (section, key, the TOML value)."""
    name, sep, value = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise MeddapError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set classify.size=32.")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise MeddapError(f"--set {item!r}: {value!r} is not a TOML value ({e}); strings need quotes, "
                          f"e.g. --set 'lora.checkpoint=\"weights/tiny/tiny-sd.safetensors\"'.") from e
    return section, key, parsed


def seed_configs(config: str, seeds: list[int], sets: list[str]) -> list[RunConfig]:
    """One checked RunConfig per seed: `config` with both seeds set to s, then the --set overrides."""
    base, path = read_config_toml(config)
    overrides = [parse_set(item) for item in sets]
    out = []
    for s in seeds:
        raw = {name: dict(section) for name, section in base.items()}
        for section, key in SEEDED:
            raw.setdefault(section, {})[key] = s
        for section, key, value in overrides:
            raw.setdefault(section, {})[key] = value
        source = f"{path} (seed {s}" + "".join(f", --set {item}" for item in sets) + ")"
        out.append(config_from_dict(raw, source))
    return out


def check_row(seed: int, out: Path, seconds: float) -> dict:
    """The check of a finished run in `out` (fold 0's classify/summary.json) as one table row."""
    summary = json.loads((out / "fold0" / "classify" / "summary.json").read_text())
    row = {"seed": seed, "seconds": round(seconds, 1)}
    for key, value in sorted(summary["check"].items()):      # "<network>/adapted", "<network>/base"
        row[key] = value["accuracy"]
        if key.endswith("/adapted"):
            row[key + "_confusion"] = value["confusion"]
    row["adapted_spread"] = summary.get("spread", {}).get("adapted", {}).get("all", float("nan"))
    return row


def table(rows: list[dict]) -> str:
    """Markdown: seed, each check accuracy, the adapted spread and confusion, seconds; then the
    min, mean and max."""
    keys = [k for k in rows[0] if k not in ("seed", "seconds", "adapted_spread") and not k.endswith("_confusion")]
    lines = ["| seed | " + " | ".join(keys) + " | adapted channel spread | adapted confusion | wall s |",
             "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        confusion = "; ".join(str(v) for k, v in r.items() if k.endswith("_confusion"))
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]:.1%}" for k in keys)
                     + f" | {r['adapted_spread']:.3f} | {confusion} | {r['seconds']:.0f} |")
    for name, f in (("min", min), ("mean", lambda v: sum(v) / len(v)), ("max", max)):
        lines.append(f"| {name} | " + " | ".join(f"{f([r[k] for r in rows]):.1%}" for k in keys)
                     + f" | {f([r['adapted_spread'] for r in rows]):.3f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="demo-fast", help="TOML file or shipped config name")
    p.add_argument("--work", required=True, help="folder of the runs (DIR/seed<s>/) and seeds.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    try:
        configs = seed_configs(args.config, args.seeds, args.sets)   # every config checked first
    except MeddapError as e:
        print(f"demo_seeds: error: {e}", file=sys.stderr)
        return 2
    from meddap.device import keep_freed_memory
    from meddap.pipeline.commands import owned_run
    keep_freed_memory()                          # as every `meddap` command, so the wall times agree

    work, rows = Path(args.work), []
    for s, cfg in zip(args.seeds, configs):
        out = work / f"seed{s}"
        t0 = time.monotonic()
        owned_run(cfg, str(out), force=False)
        rows.append(check_row(s, out, time.monotonic() - t0))
        write_json_atomic(work / "seeds.json", {"config": args.config, "sets": args.sets, "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
