"""Command-line entry points of meddap.pipeline (registered by meddap.cli):

    meddap run CONFIG [--out DIR] [--force] [--shard i/N]   the paper's protocol from one TOML file
    torchrun --nproc-per-node N -m meddap.cli run CONFIG    the same on N ranks (meddap.distributed)
    meddap demo [--out DIR] [--fast] [--force]       `meddap run` with the shipped demo config

Both hold the run's OUT with `meddap.outdir.owned_output` as command "run" (a
demo folder is a run folder); the stages inside work under it.
"""
from meddap.io import json_sha256
from meddap.outdir import FORCE_HELP, owned_output


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser("run", help="run the MEDDAP protocol from a TOML config (resumable)",
                              description="Split, USLoRA per fold, expansion, FID/KID, classifiers, Grad-CAM, "
                                          "tables and report.md. Re-running resumes; a stage is redone when "
                                          "the hashes of its inputs change.")
    from meddap.pipeline.config import shipped_configs

    p.add_argument("config", help=f"a TOML file, or a shipped config name: {', '.join(shipped_configs())}")
    p.add_argument("--out", default=None, help="output folder (default: the config's [run] out)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="run shard i of N (job arrays without torchrun): the units of unit k mod N == i of "
                        "every stage that is ready; a last run without --shard assembles the tables")
    p.set_defaults(func=_run)
    d = subparsers.add_parser("demo", help="the whole pipeline on phantoms with the shipped tiny base (CPU, offline)",
                              description="`meddap run demo`: about 2 minutes on 2 CPU cores (measured: 101-121 s on a "
                                          "2-core AVX-512 machine, where the demo before took 368-434 s), no network; "
                                          "--fast: the CI-sized variant, with one adjective and ratio, no classic arm "
                                          "or unseen set and 45 check images per class (65 s there).")
    d.add_argument("--out", default="meddap-demo", help="output folder (default: ./meddap-demo)")
    d.add_argument("--fast", action="store_true", help="smaller sizes (config demo-fast)")
    d.add_argument("--force", action="store_true", help=FORCE_HELP)
    d.set_defaults(func=_demo)


def owned_run(cfg, out, force: bool, ranks=None):
    """`meddap.pipeline.run.run(cfg, out, ranks)` inside OUT held as command "run" by the job
    (torchrun's ranks, or one --shard array, share the lock); report.md's path."""
    from meddap.distributed import Ranks
    from meddap.pipeline.config import SECTIONS
    from meddap.pipeline.run import run

    ranks = ranks or Ranks.from_environment(cfg.run.barrier_timeout_s)
    out = out or cfg.run.out
    settings = {name: cfg.section_dict(name) for name in SECTIONS}
    with owned_output(out, "run", json_sha256(settings), force, ranks.job_id), ranks:
        return run(cfg, out, ranks)


def _run(args) -> int:
    from meddap.distributed import Ranks
    from meddap.pipeline.config import load_config

    cfg = load_config(args.config)
    ranks = Ranks.parse_shard(args.shard) if args.shard else None
    owned_run(cfg, args.out, args.force, ranks)
    return 0


def _demo(args) -> int:
    import json
    from pathlib import Path

    from meddap.pipeline.config import load_config

    report = owned_run(load_config("demo-fast" if args.fast else "demo"), args.out, args.force)
    check = json.loads((Path(args.out) / "fold0" / "classify" / "summary.json").read_text())["check"]
    sets = {"adapted": "the images of the adapted base", "base": "the images of the unadapted base",
            "reconstructed": "the real test phantoms passed through the base's autoencoder (the reference)"}
    for key, value in sorted(check.items()):
        net, kind = key.split("/")
        print(f"meddap demo: {net} trained on the real phantoms classifies {sets[kind]} at {value['accuracy']:.1%}")
    print(f"meddap demo: see {report}")
    return 0
