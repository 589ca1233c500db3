"""`meddap fid DIR_A DIR_B`: FID (and KID) between two image sets, or the
quantity of the authors' fid_calc.py with `--formula as-released`.

DIR_A / DIR_B: a folder of class folders, a flat folder of images, or
SPLIT.json:FOLD:PART. Features are cached per set (meddap.fid.stats_cache).
"""
from __future__ import annotations

import argparse
import enum
import json
import sys
from pathlib import Path


class Formula(enum.Enum):
    STANDARD = "standard"        # FID of Heusel et al. 2017 with the TF-2015 graph (pytorch-fid)
    AS_RELEASED = "as-released"  # fid_calc.py of the MEDDAP authors (paper Table 1)


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = subparsers.add_parser(
        "fid", help="FID/KID between two image sets (or the paper's as-released quantity)",
        description="Fréchet Inception Distance between two image sets with pytorch-fid's "
                    "TF-2015 Inception weights (never downloaded: put them in weights/).")
    p.add_argument("dir_a", help="folder of class folders, flat image folder, or SPLIT.json:FOLD:PART")
    p.add_argument("dir_b", help="the set to compare with (same forms as DIR_A)")
    p.add_argument("--formula", choices=[f.value for f in Formula], default=Formula.STANDARD.value,
                   help="standard: FID as pytorch-fid; as-released: the authors' fid_calc.py "
                        "quantity behind the paper's Table 1 (not an FID)")
    p.add_argument("--dims", type=int, default=2048, help="feature size: 64, 192, 768 or 2048")
    p.add_argument("--kid", action="store_true", help="also compute KID (unbiased, polynomial kernel)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: images per subset (capped at the smaller set)")
    p.add_argument("--seed", type=int, default=0, help="KID: seed of the subset draws")
    p.add_argument("--per-class", action="store_true", help="also score each class present in both sets")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="weights file (default: weights/pt_inception-2015-12-05-6726825d.pth; "
                        "as-released: weights/inception_v3_google-0cc3c7bd.pth)")
    p.add_argument("--as-released-skimage", choices=["0.18", "0.19"], default="0.18",
                   help="as-released: scikit-image behaviour of the nearest resize "
                        "(0.18: float output, /255 twice; 0.19: uint8 kept, /255 once)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache (default: $XDG_CACHE_HOME/meddap/fid or ~/.cache/meddap/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_fid)


def _device(name: str | None):
    import torch

    from meddap.errors import MeddapError
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MeddapError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeddapError(f"--device {name} asked, but this machine has no usable CUDA GPU; "
                          f"use --device cpu.")
    return device


def _standard(args, sets, cache_dir, device) -> tuple[dict, list]:
    from meddap.fid.inception import DEFAULT_FID_WEIGHTS, check_dims, fid_extractor, load_fid_inception
    from meddap.fid.metrics import feature_statistics, frechet_distance_detail, kid, per_class
    from meddap.fid.stats_cache import cached_features

    check_dims(args.dims)
    net = load_fid_inception(args.inception_weights or DEFAULT_FID_WEIGHTS, device)
    extractor = fid_extractor(net, args.dims)
    feats = [cached_features(s, extractor, cache_dir=cache_dir, batch_size=args.batch_size,
                             show_progress=not args.quiet, desc=f"features {name}")
             for name, s in zip((args.dir_a, args.dir_b), sets)]
    stats = [feature_statistics(f.features, name) for f, name in zip(feats, (args.dir_a, args.dir_b))]
    r = frechet_distance_detail(*stats[0], *stats[1])
    result = {"formula": Formula.STANDARD.value, "fid": r.value, "dims": args.dims,
              "mean_term": r.mean_term, "trace_term": r.trace_term, "rank": r.rank,
              "sqrt_method": r.method.value, "offset": r.offset,
              "network": extractor.settings["network"], "weights": str(net.path),
              "weights_sha256": net.sha256, "official_weights": net.official, "notes": []}
    kid_kw = {"num_subsets": args.kid_subsets, "subset_size": args.kid_subset_size, "seed": args.seed}
    if args.kid:
        k = kid(feats[0].features, feats[1].features, **kid_kw)
        result["kid"] = {"mean": k.mean, "std": k.std, "subset_size": k.subset_size,
                         "num_subsets": k.num_subsets}
    if args.per_class:
        result["per_class"] = per_class(feats[0].features, feats[0].labels, feats[1].features,
                                        feats[1].labels, with_kid=args.kid, **kid_kw)
    if not net.official:
        result["notes"].append(f"weights {net.path} are not pytorch-fid's released file "
                               f"(SHA-256 {net.sha256[:12]}...); values are not comparable with "
                               f"published FIDs.")
    n_min = min(len(f.labels) for f in feats)
    if n_min <= args.dims:
        result["notes"].append(f"covariances are singular: {n_min} images <= {args.dims} dims, so their rank "
                               f"is at most {n_min - 1} (Σ₁Σ₂ has rank {r.rank}). The distance is exact for "
                               f"these sample statistics, but FID is biased upwards at small N: compare "
                               f"only at equal N, or use --kid.")
    if r.offset:
        result["notes"].append(f"an offset of {r.offset:g} was added to the covariance diagonals.")
    return result, feats


def _as_released(args, sets, cache_dir, device) -> tuple[dict, list]:
    from meddap.errors import MeddapError
    from meddap.fid.as_released import SkimageResize, as_released_distance, released_extractor
    from meddap.fid.imagenet_inception import DEFAULT_IMAGENET_WEIGHTS, load_imagenet_inception
    from meddap.fid.stats_cache import cached_features

    if args.dims != 2048 or args.kid:
        raise MeddapError("--formula as-released uses the 2048-d ImageNet average pool only and has "
                          "no KID; drop --dims/--kid or use --formula standard.")
    if len(sets[0].items) != len(sets[1].items):
        raise MeddapError(f"--formula as-released needs the same number of images in both sets "
                          f"(its covariances are N×N); {args.dir_a} has {len(sets[0].items)}, "
                          f"{args.dir_b} has {len(sets[1].items)}.")
    net = load_imagenet_inception(args.inception_weights or DEFAULT_IMAGENET_WEIGHTS, device)
    extractor = released_extractor(net, SkimageResize(args.as_released_skimage))
    feats = [cached_features(s, extractor, cache_dir=cache_dir, batch_size=args.batch_size,
                             show_progress=not args.quiet, desc=f"features {name}")
             for name, s in zip((args.dir_a, args.dir_b), sets)]
    result = {"formula": Formula.AS_RELEASED.value,
              "fid": as_released_distance(feats[0].features, feats[1].features), "dims": 2048,
              "skimage": args.as_released_skimage, "network": extractor.settings["network"],
              "weights": str(net.path), "weights_sha256": net.sha256, "official_weights": net.official,
              "notes": ["as-released: the MEDDAP authors' fid_calc.py quantity (paper Table 1); "
                        "it is not an FID (N×N covariances, near-constant network inputs)."]}
    if args.per_class:
        result["per_class"] = {}
        for c in sorted(set(feats[0].labels) & set(feats[1].labels)):
            a = feats[0].features[[lab == c for lab in feats[0].labels]]
            b = feats[1].features[[lab == c for lab in feats[1].labels]]
            entry = {"n1": len(a), "n2": len(b)}
            try:
                entry["fid"] = as_released_distance(a, b)
            except MeddapError as e:
                entry["error"] = str(e)
            result["per_class"][c] = entry
    if not net.official:
        result["notes"].append(f"weights {net.path} are not torchvision's IMAGENET1K_V1 file "
                               f"(SHA-256 {net.sha256[:12]}...).")
    return result, feats


def run_fid(args: argparse.Namespace) -> int:
    from meddap.errors import MeddapError
    from meddap.fid.stats_cache import default_cache_dir, resolve_folder
    from meddap.io import write_json_atomic

    sets = [resolve_folder(args.dir_a), resolve_folder(args.dir_b)]
    for spec, s in zip((args.dir_a, args.dir_b), sets):
        if len(s.items) < 2:
            raise MeddapError(f"{spec} has {len(s.items)} image; a mean and covariance need "
                              f"at least 2 images per set.")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    device = _device(args.device)
    run = _standard if Formula(args.formula) is Formula.STANDARD else _as_released
    result, feats = run(args, sets, cache_dir, device)
    result["a"], result["b"] = ({"spec": str(spec), "n": len(f.labels), "content_sha256": f.content_sha256,
                                 "from_cache": f.from_cache}
                                for spec, f in zip((args.dir_a, args.dir_b), feats))
    if args.out is not None:
        write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    name = "FID" if result["formula"] == Formula.STANDARD.value else "as-released fid_calc.py value"
    print(f"{name}: {result['fid']:.4f}  ({result['a']['n']} vs {result['b']['n']} images)")
    if "kid" in result:
        print(f"KID: {result['kid']['mean']:.6f} ± {result['kid']['std']:.6f} "
              f"({result['kid']['num_subsets']} subsets of {result['kid']['subset_size']})")
    for c, entry in result.get("per_class", {}).items():
        value = f"{entry['fid']:.4f}" if "fid" in entry else entry["error"]
        kid_s = f"  KID {entry['kid']['mean']:.6f}" if "kid" in entry else ""
        print(f"  {c or '(all)'}: {value}{kid_s}  ({entry['n1']} vs {entry['n2']})")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0
