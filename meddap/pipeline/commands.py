"""Command-line entry points of meddap.pipeline (registered by meddap.cli):

    meddap run CONFIG [--out DIR]          the paper's protocol from one TOML file
    meddap demo [--out DIR] [--fast]       `meddap run` with the shipped demo config
"""


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser("run", help="run the MEDDAP protocol from a TOML config (resumable)",
                              description="Split, USLoRA per fold, expansion, FID/KID, classifiers, Grad-CAM, "
                                          "tables and report.md. Re-running resumes; a stage is redone when "
                                          "the hashes of its inputs change.")
    from meddap.pipeline.config import shipped_configs

    p.add_argument("config", help=f"a TOML file, or a shipped config name: {', '.join(shipped_configs())}")
    p.add_argument("--out", default=None, help="output folder (default: the config's [run] out)")
    p.set_defaults(func=_run)
    d = subparsers.add_parser("demo", help="the whole pipeline on phantoms with the shipped tiny base (CPU, offline)",
                              description="`meddap run demo`: about 10 minutes on 2 CPU cores, no network; "
                                          "--fast: the CI-sized variant (about 2 minutes).")
    d.add_argument("--out", default="meddap-demo", help="output folder (default: ./meddap-demo)")
    d.add_argument("--fast", action="store_true", help="smaller sizes (config demo-fast)")
    d.set_defaults(func=_demo)


def _run(args) -> int:
    from meddap.pipeline.config import load_config
    from meddap.pipeline.run import run

    cfg = load_config(args.config)
    run(cfg, args.out)
    return 0


def _demo(args) -> int:
    from meddap.pipeline.config import load_config
    from meddap.pipeline.run import run

    import json
    from pathlib import Path

    report = run(load_config("demo-fast" if args.fast else "demo"), args.out)
    check = json.loads((Path(args.out) / "fold0" / "classify" / "summary.json").read_text())["check"]
    for key, value in sorted(check.items()):
        net, kind = key.split("/")
        print(f"meddap demo: {net} trained on the real phantoms classifies the images of the "
              f"{'adapted' if kind == 'adapted' else 'unadapted'} base at {value['accuracy']:.1%}")
    print(f"meddap demo: see {report}")
    return 0
