"""Inception features per second: meddap.fid vs pytorch-fid, same random weights.

    python scripts/bench_fid.py [--images 16] [--batch-size 8] [--device cpu] [--repeats 2]

Random weights (nothing is downloaded); pytorch-fid is needed only here and in tests.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from pytest import MonkeyPatch

from meddap.fid.inception import InceptionGraph, InceptionV3, inception_features, load_fid_inception


def best_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import pytorch_fid.inception as pfi
    state = InceptionV3(InceptionGraph.FID_TF2015).state_dict()   # default init: speed does not care
    images = torch.rand(args.images, 3, 256, 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pt_inception-2015-12-05-6726825d.pth"
        torch.save(state, path)
        net = load_fid_inception(path, args.device)
    with MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
        oracle = pfi.InceptionV3([3]).eval().to(args.device)

    def theirs():
        with torch.no_grad():
            for s in range(0, args.images, args.batch_size):
                oracle(images[s:s + args.batch_size].to(args.device))

    def ours():
        inception_features(images, weights=net, batch_size=args.batch_size, device=args.device)

    print(f"torch threads: {torch.get_num_threads()}, device {args.device}, "
          f"{args.images} images 256x256 -> 299, batch {args.batch_size}")
    print(f"pytorch-fid : {best_rate(theirs, args.images, args.repeats):6.2f} images/s")
    print(f"meddap.fid  : {best_rate(ours, args.images, args.repeats):6.2f} images/s")


if __name__ == "__main__":
    main()
