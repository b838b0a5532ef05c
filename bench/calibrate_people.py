"""Calibrate facebatch.clustering's defaults on the synthetic people (threshold, K, MIN_SIZE).

    python bench/calibrate_people.py --faces 200000

One kNN graph with the largest k (the default approximate index at this size), sliced for the
smaller ones; BCubed P/R/F, pairwise F and seconds of the clustering for each combination.
"""

from __future__ import annotations

import time

import numpy as np

import benchlib

from bench.synthetic_people import generate  # noqa: E402
from facebatch import clustering as C  # noqa: E402
from facebatch.evaluation import bcubed, pairwise_f  # noqa: E402


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.92, 0.93, 0.94, 0.95])
    ap.add_argument("--min-sizes", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args()
    emb, person, img = generate(args.faces, args.seed)
    t0 = time.perf_counter()
    sims, idx = C.knn(emb, max(args.ks), exact=args.faces <= C.EXACT_MAX, threads=1)
    print(f"{args.faces} faces (seed {args.seed}), knn k={max(args.ks)}: {time.perf_counter() - t0:.0f} s")
    print(f"{'k':>3s} {'thr':>6s} {'min':>4s} {'sec':>6s} {'BC-P':>7s} {'BC-R':>7s} {'BC-F':>7s} {'pw-F':>7s}")
    for k in args.ks:
        for t in args.thresholds:
            t0 = time.perf_counter()
            lab = C.cluster(emb, img, threshold=t, k=k, min_size=1, knn_graph=(sims[:, :k], idx[:, :k]))
            dt = time.perf_counter() - t0
            for m in args.min_sizes:
                lm = lab.copy()
                sizes = np.bincount(np.maximum(lm, 0))
                lm[(lm >= 0) & (sizes[np.maximum(lm, 0)] < m)] = -1
                p, r, f = bcubed(lm, person)
                print(f"{k:3d} {t:6.3f} {m:4d} {dt:6.1f} {p:7.4f} {r:7.4f} {f:7.4f} {pairwise_f(lm, person)[2]:7.4f}",
                      flush=True)


if __name__ == "__main__":
    main()
