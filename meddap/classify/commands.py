"""Command-line entry points of meddap.classify (registered by meddap.cli):
`meddap classify train|eval|gradcam` and `meddap tables`. `classify train`
holds its --out with `meddap.outdir.owned_output`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from meddap.device import DEVICE_HELP
from meddap.io import json_sha256
from meddap.outdir import FORCE_HELP, check_output_file, owned_output, torchrun_job_id


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    from meddap.classify.networks import Arch
    from meddap.classify.train import TrainConfig
    from meddap.settings import add_command

    p = subparsers.add_parser("classify", help="downstream classifiers: train, eval, gradcam")
    sub = p.add_subparsers(dest="classify_command", required=True, metavar="ACTION")

    t = add_command(sub, "train", TrainConfig, _train,
                    help=f"train {' / '.join(a.value for a in Arch)} (authors' defaults)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true", help=FORCE_HELP)

    e = sub.add_parser("eval", help="score a trained classifier on a labelled dataset")
    e.add_argument("--model", required=True, help="training output folder or its best.pt")
    e.add_argument("--data", required=True, help="class folder or SPLIT.json:FOLD:PART")
    e.add_argument("--device", default=None, help=DEVICE_HELP)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    e.set_defaults(func=_eval)

    g = sub.add_parser("gradcam", help="Grad-CAM overlays like MEDDAP Fig. 2")
    g.add_argument("--model", required=True, action="append",
                   help="training output folder; repeat for one column per network")
    g.add_argument("--images", required=True, help="class folder or SPLIT.json:FOLD:PART")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--target", default="predicted", choices=["predicted", "true"],
                   help="explain the predicted class or the true class")
    g.add_argument("--limit", type=int, default=None, help="at most this many images")
    g.add_argument("--device", default=None, help=DEVICE_HELP)
    g.set_defaults(func=_gradcam)

    tb = subparsers.add_parser("tables", help="Tables 1-3 and Fig. 1a from a results folder")
    tb.add_argument("results", type=Path, help="results folder (cells/*.json)")
    tb.add_argument("--out", required=True, type=Path)
    tb.add_argument("--metric", default="accuracy",
                    help="metric that selects the best condition (accuracy, f1, ...)")
    tb.set_defaults(func=_tables)


def _train(args: argparse.Namespace) -> int:
    from meddap.classify.train import TrainConfig, train_classifier
    from meddap.settings import as_dict, from_args
    cfg = from_args(TrainConfig, args, show_progress=not args.quiet)
    with owned_output(cfg.out, "classify train", json_sha256(as_dict(cfg)), args.force,
                      torchrun_job_id()):
        s = train_classifier(cfg)
    print(f"best validation accuracy {s['best_val_accuracy']:.4f} at epoch {s['best_epoch']}; "
          f"{s['init_description']}; weights in {cfg.out / 'best.pt'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from meddap.classify.evaluate import evaluate, format_report
    from meddap.io import write_json_atomic
    if args.out is not None:
        check_output_file(args.out, "--out", "eval.json")
    result = evaluate(args.model, args.data, device=args.device, batch_size=args.batch_size,
                      n_boot=args.bootstrap, seed=args.seed)
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _gradcam(args: argparse.Namespace) -> int:
    from meddap.classify.gradcam import write_gradcam_panels
    n = write_gradcam_panels(args.model, args.images, args.out, target=args.target,
                             limit=args.limit, device=args.device)
    print(f"wrote {n} Grad-CAM panels to {args.out}")
    return 0


def _tables(args: argparse.Namespace) -> int:
    from meddap.classify.tables import write_tables
    written = write_tables(args.results, args.out, metric=args.metric)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
