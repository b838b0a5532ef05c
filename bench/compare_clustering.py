"""Compare graph clustering candidates for people on the synthetic set (the measurement behind
facebatch.clustering's choice).

    python bench/compare_clustering.py --faces 100000 --thresholds 0.92 0.93 0.94

Every candidate gets the same kNN graph (facebatch.clustering.knn, k=K) cut at the threshold
and the same cannot-link repair (for the candidates that have no constraint of their own: in each
(cluster, photo) only the face closest to the cluster's centroid stays, the others become -1);
clusters below MIN_SIZE become -1. Printed: seconds (clustering only), BCubed P/R/F, pairwise F.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import benchlib

from bench.synthetic_people import generate  # noqa: E402
from facebatch import clustering as C  # noqa: E402
from facebatch.evaluation import bcubed, pairwise_f  # noqa: E402


def _edges(g, t, mutual=False):
    s, i = g
    n = len(s)
    r = np.repeat(np.arange(n), s.shape[1])
    c, w = i.ravel(), s.ravel()
    keep = (c >= 0) & (w >= t)
    r, c, w = r[keep], c[keep], w[keep]
    if mutual:
        key = r * n + c
        rev = c * n + r
        keep = np.isin(key, rev)
        r, c, w = r[keep], c[keep], w[keep]
    return r, c, w


def repair(labels, emb, img, min_size):
    """Cannot-link repair + min_size for candidates without constraints."""
    lab = labels.copy()
    sel = lab >= 0
    u, cents = C.centroids(emb, lab)
    pos = np.searchsorted(u, lab[sel])
    sim = np.full(len(lab), -np.inf, np.float32)
    sim[sel] = np.einsum("ij,ij->i", emb[sel], cents[pos])
    idx = np.flatnonzero(sel)
    order = idx[np.lexsort((-sim[idx], lab[idx], img[idx]))]
    dup = np.zeros(len(order), bool)
    dup[1:] = (img[order][1:] == img[order][:-1]) & (lab[order][1:] == lab[order][:-1])
    lab[order[dup]] = -1
    sizes = np.bincount(np.maximum(lab, 0), minlength=1)
    lab[(lab >= 0) & (sizes[np.maximum(lab, 0)] < min_size)] = -1
    return lab


def single_linkage(emb, img, g, t, min_size):
    r, c, _ = _edges(g, t)
    n = len(emb)
    _, lab = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)), directed=False)
    return repair(lab.astype(np.int64), emb, img, min_size)


def dbscan_like(emb, img, g, t, min_size, min_pts=3):
    """Immich/PhotoPrism style: core faces have >= min_pts-1 neighbours above t; clusters are
    components of core-core edges; a border face joins its most similar core neighbour."""
    r, c, w = _edges(g, t)
    n = len(emb)
    deg = np.bincount(r, minlength=n)
    core = deg >= min_pts - 1
    cc = core[r] & core[c]
    _, lab = connected_components(coo_matrix((np.ones(cc.sum()), (r[cc], c[cc])), shape=(n, n)), directed=False)
    out = np.where(core, lab, -1).astype(np.int64)
    b = ~core[r] & core[c]
    if b.any():
        best, _ = C._best_per_source(r[b], c[b], w[b], n)
        has = best >= 0
        out[has & ~core] = lab[best[has & ~core]]
    return repair(out, emb, img, min_size)


def chinese_whispers(emb, img, g, t, min_size, iterations=20, seed=0):
    """dlib-style Chinese whispers over the mutual kNN graph cut at t (weights = similarity);
    each iteration updates a random half of the faces to their neighbours' heaviest label."""
    r, c, w = _edges(g, t, mutual=True)
    n = len(emb)
    lab = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        upd = rng.random(n) < 0.5
        sel = upd[r]
        rr, ll, ww = r[sel], lab[c[sel]], w[sel]
        key, inv = np.unique(rr * n + ll, return_inverse=True)
        tot = np.bincount(inv, weights=ww)
        best, _ = C._best_per_source(key // n, key % n, tot.astype(np.float32), n)
        m = best >= 0
        lab[m] = best[m]
    return repair(lab, emb, img, min_size)


def average_linkage(emb, img, g, t, min_size):
    return C.cluster(emb, img, threshold=t, min_size=min_size, knn_graph=g)


CANDIDATES = {
    "single linkage": single_linkage,
    "dbscan-like (min_pts 3)": dbscan_like,
    "chinese whispers (mutual)": chinese_whispers,
    "average linkage (chosen)": average_linkage,
}


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--faces", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=C.K)
    ap.add_argument("--min-size", type=int, default=C.MIN_SIZE)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.92, 0.93, 0.94])
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    emb, person, img = generate(args.faces, args.seed)
    t0 = time.perf_counter()
    g = C.knn(emb, args.k)
    print(f"{args.faces} faces, {len(np.unique(person))} people; knn k={args.k}: {time.perf_counter() - t0:.1f}s")
    print(f"{'candidate':28s} {'thr':>5s} {'sec':>6s} {'BC-P':>6s} {'BC-R':>6s} {'BC-F':>6s} {'pw-F':>6s} {'noise':>6s}")
    for name, fn in CANDIDATES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        for t in args.thresholds:
            t0 = time.perf_counter()
            lab = fn(emb, img, g, t, args.min_size)
            dt = time.perf_counter() - t0
            assert C.cannot_link_violations(lab, img) == 0
            p, r, f = bcubed(lab, person)
            print(f"{name:28s} {t:5.3f} {dt:6.1f} {p:6.4f} {r:6.4f} {f:6.4f} {pairwise_f(lab, person)[2]:6.4f} "
                  f"{np.mean(lab < 0):6.3f}", flush=True)


if __name__ == "__main__":
    main()
