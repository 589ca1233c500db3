"""`meddap fid DIR_A DIR_B`: FID (and KID) between two image sets, or the
quantity of the authors' fid_calc.py with `--formula as-released`.

DIR_A / DIR_B: a folder of class folders, a flat folder of images, or
SPLIT.json:FOLD:PART. The flags are the fields of meddap.fid.config.FidConfig;
the scoring is meddap.fid.score.score_sets with DIR_A as the reference, the
same function stage 6 of `meddap run` calls. Features are cached per set
(meddap.fid.stats_cache).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meddap.fid.config import FidConfig, Formula
from meddap.fid.prdc import PRDC_NAMES
from meddap.outdir import check_output_file
from meddap.settings import add_command, from_args


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
    p = add_command(subparsers, "fid", FidConfig, run_fid,
                    help="FID/KID between two image sets (or the paper's as-released quantity)",
                    description="Fréchet Inception Distance between two image sets with pytorch-fid's "
                                "TF-2015 Inception weights (never downloaded: put them in weights/).")
    p.add_argument("dir_a", help="folder of class folders, flat image folder, or SPLIT.json:FOLD:PART")
    p.add_argument("dir_b", help="the set to compare with (same forms as DIR_A)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")


def pair_result(scored: dict, name: str) -> dict:
    """score_sets' result for one set `name` against the reference, in the layout
    `meddap fid` has always printed: {"formula", "fid", "dims", ..., "a", "b"}."""
    s = scored["sets"][name]
    result = {"formula": scored["formula"], "fid": s["frechet"], "dims": scored["dims"]}
    if scored["formula"] == Formula.STANDARD.value:
        result.update({k: s[k] for k in ("mean_term", "trace_term", "rank", "sqrt_method", "offset")})
    else:
        result["skimage"] = scored["skimage"]
    result.update({k: scored[k] for k in ("feature_space", "is_fid", "network", "weights",
                                          "weights_sha256", "official_weights")})
    result["notes"] = scored["notes"] + s["notes"]
    if "kid" in s:
        result["kid"] = {"mean": s["kid"], "std": s["kid_std"], "subset_size": s["kid_subset_size"],
                         "num_subsets": s["kid_num_subsets"]}
    if "precision" in s:                                  # --prdc (Naeem et al. 2020), at the top level
        result.update({k: s[k] for k in PRDC_NAMES})
    if "per_class" in s:
        result["per_class"] = s["per_class"]
    result["a"] = scored["reference"]
    result["b"] = {k: s[k] for k in ("spec", "n", "content_sha256", "from_cache")}
    return result


def run_fid(args: argparse.Namespace) -> int:
    from meddap.fid.score import score_sets
    from meddap.io import write_json_atomic

    cfg = from_args(FidConfig, args)
    if args.out is not None:
        check_output_file(args.out, "--out", "fid.json")
    result = pair_result(score_sets(cfg, args.dir_a, {args.dir_b: args.dir_b}), args.dir_b)
    if args.out is not None:
        write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["formula"] == Formula.AS_RELEASED.value:
        name = "as-released fid_calc.py value"
    else:
        name = "FID" if result["is_fid"] else "Fréchet distance of grey thumbnails (NOT FID)"
    print(f"{name}: {result['fid']:.4f}  ({result['a']['n']} vs {result['b']['n']} images)")
    if "kid" in result:
        print(f"KID: {result['kid']['mean']:.6f} ± {result['kid']['std']:.6f} "
              f"({result['kid']['num_subsets']} subsets of {result['kid']['subset_size']})")
    if "precision" in result:
        print("  ".join(f"{k} {result[k]:.4f}" for k in PRDC_NAMES) + f"  (k = {cfg.prdc_k})")
    for c, entry in result.get("per_class", {}).items():
        value = f"{entry['fid']:.4f}" if "fid" in entry else entry["error"]
        kid_s = f"  KID {entry['kid']['mean']:.6f}" if "kid" in entry else ""
        prdc_s = ("  " + "  ".join(f"{k} {entry[k]:.4f}" for k in PRDC_NAMES) if "precision" in entry
                  else f"  PRDC: {entry['prdc_error']}" if "prdc_error" in entry else "")
        print(f"  {c or '(all)'}: {value}{kid_s}{prdc_s}  ({entry['n1']} vs {entry['n2']})")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0
