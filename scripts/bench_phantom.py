"""Phantom speed on one core: images per second at 256 px, PNG encoding included.

    python scripts/bench_phantom.py [--n 200] [--size 256] [--site a]

Threads are pinned to one before numpy loads, so the number is a one-core figure.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

from meddap.data.phantom import CLASSES, PROBES, Site, png_bytes, image_rng, simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--site", choices=[s.value for s in Site], default="a")
    args = parser.parse_args()
    site = Site(args.site)
    jobs = [(CLASSES[i % 3], i) for i in range(args.n)]
    simulate(image_rng(0, site, "benign", 0), "benign", PROBES[site], args.size)   # warm-up
    t0 = time.perf_counter()
    for label, i in jobs:
        image, mask = simulate(image_rng(0, site, label, i), label, PROBES[site], args.size)
        png_bytes(image), png_bytes(mask)
    dt = time.perf_counter() - t0
    print(f"site {site.value}, {args.size} px: {args.n / dt:.1f} images/s "
          f"({1e3 * dt / args.n:.1f} ms per image, PNG encoding included)")


if __name__ == "__main__":
    main()
