"""Command-line entry points of meddap.data (registered by meddap.cli):

    meddap dataset-info DIR [--json] [--strict]
    meddap split DATA --out split.json [--val 115] [--test 120] [--folds 5] [--seed 0] [--strict] [--force]
    meddap leakage A [B] [--json] [--max-hamming 48]
    meddap phantom --out DIR [--seed 0] [--site a|b] [--size 256] [--counts benign=437,...] [--force]
    meddap expand --checkpoint PATH --lora PATH --data DIR_OR_SPLIT --out OUT [options] [--force]

phantom and expand hold their output folder with `meddap.outdir.owned_output`
(never a folder that meddap did not make); split's --out is one file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from meddap import settings
from meddap.data.datasets import describe, load_rgb, resolve_images
from meddap.data.hashing import NEAR_DUPLICATE_HAMMING, cross_duplicates, hash_file
from meddap.data.phantom import Site, parse_counts, write_phantom
from meddap.data.splits import SplitConfig, write_split
from meddap.errors import MeddapError
from meddap.io import json_sha256
from meddap.outdir import FORCE_HELP, check_output_file, owned_output, torchrun_job_id


def _dataset_info(args) -> int:
    info = describe(resolve_images(args.data, check=True, strict=args.strict))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['root']}: {info['total']} images, layout {info['layout']}")
    for c, n in info["classes"].items():
        print(f"  {c:<12} {n:6d} images, {info['masks'][c]:5d} masks "
              f"({info['images_with_masks'][c]} images with a mask)")
    if info["unreadable"]:
        print(f"{len(info['unreadable'])} unreadable files:")
        print("\n".join(f"  {p}: {_why_unreadable(p)}" for p in info["unreadable"]))
    if info["orphan_masks"]:
        print(f"{len(info['orphan_masks'])} masks without an image:")
        print("\n".join(f"  {p}" for p in info["orphan_masks"]))
    return 0


def _why_unreadable(path: str) -> str:
    """Why `load_rgb` refuses `path` (decoded once more: unreadable files are few)."""
    try:
        load_rgb(path)
    except MeddapError as e:
        return str(e).splitlines()[0]
    return "readable now (it changed during the scan)"


def _split(args) -> int:
    cfg = settings.from_args(SplitConfig, args)
    check_output_file(args.out, "--out", "split.json")
    m = write_split(args.data, args.out, cfg, strict=args.strict, show_progress=not args.quiet,
                    replace=args.force)
    print(f"{args.out}: {cfg.folds} folds of {m['n_images']} images, "
          f"{len(m['duplicate_groups'])} duplicate groups kept together, test sets "
          f"{'disjoint' if m['test_sets_disjoint'] else 'OVERLAPPING (too few images for disjoint folds)'}")
    for f, counts in enumerate(m["counts"]):
        parts = ", ".join(f"{p} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                          for p, c in counts.items())
        print(f"  fold {f}: {parts}")
    if m["unreadable"]:
        print(f"skipped {len(m['unreadable'])} unreadable files: " + ", ".join(m["unreadable"]),
              file=sys.stderr)
    return 0


def _leakage_pairs(a_spec: str, b_spec: str, max_hamming: int, cache: dict) -> list[dict]:
    """Duplicate pairs between two folders/split parts; `cache` maps a path to
    its FileHash (or None when unreadable) so each file is hashed once."""
    hashed = []
    for spec in (a_spec, b_spec):
        hashes, labels, bad = [], [], []
        for it in resolve_images(spec).items:
            if it.path not in cache:
                try:
                    cache[it.path] = hash_file(it.path)
                except MeddapError:
                    cache[it.path] = None
            if cache[it.path] is None:
                bad.append(it.path)
            else:
                hashes.append(cache[it.path])
                labels.append(it.label)
        if bad:
            print(f"{spec}: skipped {len(bad)} unreadable files: " + ", ".join(map(str, bad)),
                  file=sys.stderr)
        hashed.append((hashes, labels))
    (ha, la), (hb, lb) = hashed
    return [{"a": str(ha[i].path), "a_class": la[i], "b": str(hb[j].path), "b_class": lb[j],
             "kind": kind, "hamming": d}
            for i, j, kind, d in cross_duplicates(ha, hb, max_hamming)]


def _leakage(args) -> int:
    """Duplicates of A found in B; exit code 1 when there are any."""
    if args.b is None:
        path = Path(args.a)
        try:
            folds = json.loads(path.read_text(encoding="utf-8"))["folds"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MeddapError(f"{args.a}: with one argument, leakage expects a split manifest "
                              f"written by `meddap split` ({e}).") from None
        checks = [(f"{args.a}:{f}:{p}", f"{args.a}:{f}:{q}")
                  for f in range(len(folds)) for p, q in (("train", "val"), ("train", "test"),
                                                          ("val", "test"))]
    else:
        checks = [(args.a, args.b)]
    report, cache = [], {}
    for a, b in checks:
        pairs = _leakage_pairs(a, b, args.max_hamming, cache)
        report.append({"a": a, "b": b, "duplicates": pairs})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in report:
            print(f"{r['a']} vs {r['b']}: {len(r['duplicates'])} duplicate pair(s)")
            for p in r["duplicates"]:
                print(f"  {p['kind']:<5} (hamming {p['hamming']:3d}) {p['a']} [{p['a_class']}]"
                      f" == {p['b']} [{p['b_class']}]")
    return 1 if any(r["duplicates"] for r in report) else 0


def _phantom(args) -> int:
    site = Site(args.site)
    counts = parse_counts(args.counts) if args.counts else None
    chosen = {"seed": args.seed, "site": site.value, "size": args.size, "counts": counts}
    with owned_output(args.out, "phantom", json_sha256(chosen), args.force):
        record = write_phantom(args.out, args.seed, site, args.size, counts,
                               show_progress=not args.quiet)
    total = sum(record["counts"].values())
    print(f"{args.out}: {total} phantom images (site {site.value}, {args.size} px, seed {args.seed}): "
          + ", ".join(f"{c} {n}" for c, n in record["counts"].items()))
    return 0


def _expand(args) -> int:
    from meddap.data.expand import ExpandConfig, expand
    from meddap.distributed import Ranks
    from meddap.sampling.generation import MANIFEST_NAME

    cfg = settings.from_args(ExpandConfig, args)
    with owned_output(cfg.out, "expand", json_sha256(settings.as_dict(cfg)), args.force,
                      torchrun_job_id()):
        with Ranks.from_environment() as ranks:         # torchrun: joins the group for the run
            summary = expand(cfg, ranks)
    if summary and not cfg.quiet:
        print(f"meddap expand: {summary['n_files']} files in {cfg.out}; manifest "
              f"{Path(cfg.out) / MANIFEST_NAME}", file=sys.stderr)
    return 0


def _add_expand(sub) -> None:
    from meddap.data.expand import ExpandConfig

    p = settings.add_command(sub, "expand", ExpandConfig, _expand,
                             help="generate the expanded training sets (MEDDAP section 3.3)",
                             description="Generate int(count x ratio) synthetic images per class and "
                                         "adjective into OUT/{adjective|no_adjective}/ratio_{r}/train/"
                                         "{class}/, with a JSONL manifest. Re-run to resume; launch with "
                                         "torchrun to share the work between processes.")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser("dataset-info", help="per-class counts, masks and unreadable files",
                              description="Count images and masks of a class-folder dataset "
                                          "(BUSI, Dataset B or any ImageFolder) or a split part.")
    p.add_argument("data", help="folder of class folders, or SPLIT.json:FOLD:PART")
    p.add_argument("--json", action="store_true", help="print JSON: classes, masks, unreadable, ...")
    p.add_argument("--strict", action="store_true", help="an unreadable file is an error")
    p.set_defaults(func=_dataset_info)

    p = settings.add_command(subparsers, "split", SplitConfig, _split,
                             help="leakage-safe stratified k-fold split manifest",
                             description="Stratified, duplicate-aware train/val/test folds; "
                                         "defaults are the paper's 545/115/120 x 5 folds.")
    p.add_argument("data", help="folder of class folders")
    p.add_argument("--out", required=True, help="manifest to write (JSON)")
    p.add_argument("--strict", action="store_true", help="an unreadable file is an error")
    p.add_argument("--force", action="store_true", help="replace an existing --out that holds another split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = subparsers.add_parser("leakage", help="duplicates of one folder/split part in another",
                              description="Report files of A that duplicate files of B (exact: "
                                          "same SHA-256; near: pHash). With only A = split.json, "
                                          "check train/val/test of every fold. Exit code 1 if any.")
    p.add_argument("a", help="folder, SPLIT.json:FOLD:PART, or a split manifest alone")
    p.add_argument("b", nargs="?", help="folder or SPLIT.json:FOLD:PART")
    p.add_argument("--max-hamming", type=int, default=NEAR_DUPLICATE_HAMMING,
                   help=f"near-duplicate pHash distance (default {NEAR_DUPLICATE_HAMMING}; -1: exact copies only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_leakage)

    p = subparsers.add_parser("phantom", help="synthetic breast-ultrasound dataset in BUSI layout",
                              description="Simulated B-mode images with lesion masks; class is carried "
                                          "by lesion shape (BI-RADS), not brightness.")
    p.add_argument("--out", required=True, help="output folder (BUSI layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site", choices=["a", "b"], default="a",
                   help="a: BUSI-like linear probe (default); b: Dataset-B-like convex probe, "
                        "rotated and sharpened")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--counts", default=None,
                   help="CLASS=N,... (default site a: benign=437,malignant=210,normal=133; "
                        "site b: benign=500,malignant=400)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_phantom)

    _add_expand(subparsers)
