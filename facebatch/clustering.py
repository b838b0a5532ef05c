"""People clustering core: kNN graph, constrained average-linkage clustering, incremental assignment.

    from facebatch.clustering import knn, cluster, assign, centroids
    labels = cluster(emb, image_keys)                 # int64 per face, -1 = no person
    persons, cents = centroids(emb, labels)           # sorted labels, unit centroids
    row, sim = assign(new_emb, cents, ASSIGN_THRESHOLD, image_keys_new=new_keys)
    index = build_search_index(emb); save_index(index, path); search(load_index(path), q, 20)

Pure library: numpy + faiss (CPU); Ray only inside :func:`knn_distributed`. Embeddings are
L2-normalised float32 (n, 128), so inner product = cosine similarity.

Algorithm (cluster)
-------------------
1. kNN graph: top-K neighbours per face (:func:`knn`), cut at ``threshold``; pairs of faces of
   one photo dropped; undirected.
2. Average linkage (UPGMA on cosine) restricted to that graph. Each cluster keeps the sum S and
   count n of its unit vectors, so the average similarity over *all* face pairs of two clusters
   is exactly ``S_a . S_b / (n_a n_b)``: one dot product, whatever their sizes. It is evaluated
   only for cluster pairs joined by a kNN edge. Merging goes in vectorised rounds: each cluster
   finds its best partner; reciprocal best pairs merge (for a reducible linkage like average
   linkage this is what sequential greedy HAC does), and a cluster whose best partner is in such
   a pair joins that merge ("star") if the whole star's average cross-part similarity stays
   >= threshold (else only the pair merges). Stars make big persons converge in ~10-30 rounds
   instead of one face per round. Stops when no pair is >= threshold.
3. Constraints, checked on every proposed merge: cannot-link (two clusters holding faces of one
   photo never merge: the pair's edge is dropped for good, since any superset would clash too)
   and names (faces of one name start as one cluster - the user's label wins over the photo
   rule; clusters with two different names never merge; a named star member only joins a core
   of its own name).
4. Clusters below ``min_size`` faces get -1 unless they carry a name; labels 0.. by size.

Hand-written: the merge rounds (no library does constrained average linkage on a sparse graph
with cannot-link at this scale: scipy's linkage is dense O(n^2) memory, sklearn's
AgglomerativeClustering with a connectivity graph has no cannot-link and is O(n^2) time in
practice); all of it is numpy array code, loops only over rounds. The nearest-neighbour search
is faiss.

Why average linkage (bench/compare_clustering.py, same kNN graph K=10, same cannot-link repair
and MIN_SIZE for the others; synthetic people of bench/synthetic_people.py, 20,000 faces, 4,310
people; BCubed P/R/F and pairwise F):

==========================  =====  ======  ======  ======  ======
candidate                   thr    BC-P    BC-R    BC-F    pw-F
==========================  =====  ======  ======  ======  ======
single linkage              0.93   0.8836  0.9804  0.9295  0.4416
single linkage              0.94   0.9738  0.9947  0.9841  0.9128
dbscan-like (Immich, mp 3)  0.93   0.8836  0.9532  0.9171  0.4414
dbscan-like (Immich, mp 3)  0.94   0.9738  0.9656  0.9697  0.9126
chinese whispers (mutual)   0.93   0.9957  0.4891  0.6560  0.0667
average linkage (chosen)    0.92   0.9794  0.9990  0.9891  0.9917
average linkage (chosen)    0.93   0.9934  0.9961  0.9947  0.9955
average linkage (chosen)    0.94   0.9988  0.9912  0.9950  0.9935
==========================  =====  ======  ======  ======  ======

Single linkage and DBSCAN-like core points chain lookalikes into giant clusters (pairwise F
0.44 at 0.93: precision collapses) unless the threshold is raised, which then splits people;
Chinese whispers over mutual kNN neighbours fragments the big persons (a mutual top-10 graph of
a person with thousands of faces falls apart). All run in about a second at 20k.

kNN index (measured on synthetic faces; the machine was shared, load 4-11 on 2 cores, so the
seconds are pessimistic and only comparable within a row group)
-----------------------------------------------------------------------------------------
At 200k faces, exact graph: BCubed F 0.9929 at 0.93. IVF-Flat (4 sqrt n lists): nprobe 4:
id-recall 0.79, F 0.9918, 44 s; nprobe 8: 0.84, F 0.9931, 85 s; nprobe 16: 0.88, F 0.9932,
219 s. HNSW (M 16, efC 40, ef 32): id-recall 0.59, F 0.9347, 149 s - this data (thousands of
nearly equidistant faces per big person) defeats the graph walk. At 100k, IVF-PQ fast-scan
(PQ32x4fs, 16 bytes/face) with exact re-ranking of nprobe 8 x k_factor 16 candidates: id-recall
0.62 but F 0.9946 (IVF-Flat nprobe 8: 0.9945) in about half the time of IVF-Flat. The clustering
needs *some* above-threshold same-person edges, not the exact top-k, so the graph uses the
cheap setting (GRAPH_NPROBE, GRAPH_K_FACTOR) and search the thorough one (SEARCH_NPROBE,
SEARCH_K_FACTOR: id-recall 0.968 at 20k). One index type, ``IVF{4 sqrt n},PQ32x4fs,RFlat``,
serves both; re-ranking makes every returned similarity exact. 2 sqrt(n) lists and 10 k-means
iterations instead of 4 sqrt(n) and 25: at 100k F 0.9944 vs 0.9948, build 4x cheaper.

Defaults (calibration)
----------------------
- CLUSTER_THRESHOLD = 0.93: the average similarity two groups of faces need to be one person.
  It is the shared pairs' calibrated verification threshold (facebatch.embedder, accuracy
  0.999 on 2,003 pairs), and on the synthetic set (fitted to those pairs) it is the knee:
  20k faces F 0.9891 / 0.9947 / 0.9950 at 0.92 / 0.93 / 0.94 (precision 0.979 / 0.993 / 0.999);
  see CALIBRATION below for larger sets.
- ASSIGN_THRESHOLD = 0.93: cosine to a person's unit centroid. A centroid of many faces is
  closer to each of them than they are to each other (same person: ~0.986 vs 0.972), so this
  is a little more lenient than the cluster rule for one face and the same for big persons.
- K = 10, MIN_SIZE = 2: see CALIBRATION.
- EXACT_MAX = 50,000: exact search up to there (seconds), the IVF index above.

CALIBRATION (``python bench/calibrate_people.py --faces 100000``: 100,000 synthetic faces, a
different seed (11) from the comparison, the approximate graph of the default index, BCubed
P / R / F; seconds of clustering on a machine at load ~10):

====  =====  =========================  =========================  =====
K     thr    MIN_SIZE 2: P / R / F      MIN_SIZE 3: F              sec
====  =====  =========================  =========================  =====
5     0.93   0.9917 / 0.9951 / 0.9934   0.9796                     11
10    0.92   0.9784 / 0.9977 / 0.9880   0.9753                     22
10    0.93   0.9911 / 0.9954 / 0.9932   0.9795                     19
10    0.94   0.9981 / 0.9896 / 0.9938   0.9795                     18
10    0.95   0.9999 / 0.9754 / 0.9875   0.9732                     16
20    0.93   0.9907 / 0.9951 / 0.9929   0.9792                     29
====  =====  =========================  =========================  =====

- threshold: F is flat between 0.93 and 0.94 (0.9932 / 0.9938) and falls either side; 0.93 is
  kept because it is also the shared pairs' own verification threshold and keeps more recall
  for people with few, harder photos (real same-person pairs: 2-3% fall between 0.93 and
  0.94). 0.94 is the precision-first choice (BCubed P 0.998 vs 0.991): pass
  ``threshold=0.94`` where merging two people is worse than splitting one.
- K: 5, 10 and 20 give the same F (0.9934 / 0.9932 / 0.9929); 10 is kept as a margin for the
  approximate graph at larger n (its recall per query falls as lists grow); 5 clusters ~40%
  faster.
- At 1,000,000 faces (bench/bench_people.py, defaults, one faiss thread, machine at load ~10):
  BCubed P / R / F 0.9902 / 0.9924 / 0.9913, pairwise F 0.9969; index build 25 s, kNN 158 s,
  cluster 76 s of CPU (742 s wall at that load), peak RSS 2.9 GiB.
- ASSIGN_THRESHOLD is not calibrated separately yet: at 1M, 87.5% of 10,000 new faces were
  assigned and 95.2% of those went to a cluster whose majority is their person.
- MIN_SIZE: 2. A 3 costs 0.014 F (people seen twice become noise); the job can still hide small
  people in its views.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = [
    "CLUSTER_THRESHOLD", "ASSIGN_THRESHOLD", "K", "MIN_SIZE", "EXACT_MAX",
    "knn", "knn_rows", "knn_distributed", "knn_recall", "id_recall", "build_search_index", "save_index", "load_index", "search",
    "cluster", "assign", "centroids", "cannot_link_violations",
]

# Defaults (calibration: module docstring).
CLUSTER_THRESHOLD = 0.93
ASSIGN_THRESHOLD = 0.93
K = 10
MIN_SIZE = 2
EXACT_MAX = 50_000          # knn(exact=None): exact below this many base rows
GRAPH_NPROBE = 8           # self-kNN graph (1M queries: speed first): lists scanned
GRAPH_K_FACTOR = 16        # ... and candidates re-ranked exactly per neighbour
IVF_LISTS_PER_SQRT_N = 2   # nlist = 2 sqrt(n) (fast-scan lists are cheap to scan; k-means is not)
IVF_KMEANS_ITERS = 10
IVF_TRAIN_PER_LIST = 40    # k-means sample: 40 faces per list
SEARCH_NPROBE = 32         # search (a handful of queries: recall first): lists scanned
SEARCH_K_FACTOR = 128      # ... and candidates re-ranked exactly per result

_BLOCK = 65_536


def _faiss(threads: int | None = None):
    import faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    return faiss


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
    return x


# ---------------------------------------------------------------------------------------------
# kNN

def _ivf(index):
    """The IVF part of an index (IVF, or IndexRefine around an IVF), else None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_params(index, *, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Set an approximate index's nprobe (lists scanned) and k_factor (candidates re-ranked
    exactly per result); no-op for exact indexes."""
    ivf = _ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)
    if k_factor is not None and hasattr(index, "k_factor"):
        index.k_factor = float(k_factor)


def _search_params(index) -> tuple[int | None, float | None]:
    ivf = _ivf(index)
    return (ivf.nprobe if ivf is not None else None, getattr(index, "k_factor", None))


def build_search_index(embeddings: np.ndarray, *, exact: bool | None = None, threads: int | None = None,
                       seed: int = 1234):
    """A faiss inner-product index over ``embeddings`` (row i = id i).

    Exact (IndexFlatIP) up to EXACT_MAX faces; above, ``IVF{2 sqrt n},PQ32x4fs,RFlat``: an
    inverted file whose lists hold 4-bit product-quantised codes scanned with SIMD (fast-scan),
    the best ``k * k_factor`` candidates re-ranked with the exact vectors, so the similarities
    it returns are exact. k-means runs on a fixed-seed sample, so the same input builds the same
    index. Size: 512 bytes per face for the vectors + 16 for the code (+ lists, ids).
    Search defaults: SEARCH_NPROBE lists, SEARCH_K_FACTOR (saved with the index)."""
    faiss = _faiss(threads)
    x = _as_f32(embeddings)
    n, d = x.shape
    if exact is None:
        exact = n <= EXACT_MAX
    if exact:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(max(1, min(IVF_LISTS_PER_SQRT_N * np.sqrt(n), n // IVF_TRAIN_PER_LIST)))
        index = faiss.index_factory(d, f"IVF{nlist},PQ{d // 4}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        ivf = _ivf(index)
        ivf.cp.seed = seed
        ivf.cp.niter = IVF_KMEANS_ITERS
        rng = np.random.default_rng(seed)
        m = min(n, nlist * IVF_TRAIN_PER_LIST)
        index.train(x[np.sort(rng.choice(n, m, replace=False))] if m < n else x)
        set_search_params(index, nprobe=SEARCH_NPROBE, k_factor=SEARCH_K_FACTOR)
    index.add(x)
    return index


def save_index(index, path: str | os.PathLike | None = None) -> bytes | None:
    """Write ``index`` to ``path``; without a path return its bytes."""
    faiss = _faiss()
    if path is None:
        return faiss.serialize_index(index).tobytes()
    faiss.write_index(index, str(path))
    return None


def load_index(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview):
    faiss = _faiss()
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return faiss.deserialize_index(np.frombuffer(path_or_bytes, dtype=np.uint8))
    return faiss.read_index(str(path_or_bytes))


def search(index, queries: np.ndarray, k: int, *, nprobe: int | None = None,
           k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` in ``index``: (similarities float32 (q,k), indices int64 (q,k), -1 where
    fewer). ``nprobe`` / ``k_factor`` override the index's own for this call."""
    q = _as_f32(queries)
    before = _search_params(index)
    set_search_params(index, nprobe=nprobe, k_factor=k_factor)
    try:
        return _search(index, q, k)
    finally:
        set_search_params(index, nprobe=before[0], k_factor=before[1])


def _search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.full((len(q), k), -np.inf, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    for lo in range(0, len(q), _BLOCK):
        s, i = index.search(q[lo:lo + _BLOCK], k)
        sims[lo:lo + len(s)], idx[lo:lo + len(s)] = s, i
    sims[idx < 0] = -np.inf
    return sims, idx


def _drop_self(sims: np.ndarray, idx: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its k+1 results (or the last one when it is absent)."""
    drop = idx == ids[:, None]
    none = ~drop.any(axis=1)
    drop[none, -1] = True
    keep = ~drop
    return sims[keep].reshape(len(ids), k), idx[keep].reshape(len(ids), k)


def knn(base: np.ndarray, k: int, queries: np.ndarray | None = None, *, exact: bool | None = None,
        threads: int | None = None, index=None, nprobe: int = GRAPH_NPROBE,
        k_factor: float = GRAPH_K_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of ``queries`` (default: every base row, excluding itself) among ``base``.

    Returns (similarities float32 (q,k), indices int64 (q,k)), best first, -1 / -inf where fewer
    than k. ``exact=None``: exact up to EXACT_MAX base rows, the approximate index of
    :func:`build_search_index` above, searched with the graph setting (``nprobe`` lists,
    ``k_factor`` candidates re-ranked per neighbour). ``index`` reuses an index built by :func:`build_search_index` over
    ``base``."""
    x = _as_f32(base)
    self_knn = queries is None
    q = x if self_knn else _as_f32(queries)
    if index is None:
        index = build_search_index(x, exact=exact, threads=threads)
    else:
        _faiss(threads)
    kk = min(k + 1 if self_knn else k, len(x))
    sims, idx = search(index, q, max(kk, 1), nprobe=nprobe, k_factor=k_factor)
    if self_knn:
        if kk == k + 1:
            sims, idx = _drop_self(sims, idx, np.arange(len(q)), k)
        else:  # fewer base rows than k+1
            sims, idx = _drop_self(sims, idx, np.arange(len(q)), kk - 1)
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims.astype(np.float32), idx.astype(np.int64)


def knn_rows(base: np.ndarray, rows: np.ndarray, k: int, *, exact: bool | None = None,
             threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A kNN graph over ``base`` (n rows, each excluding itself) in which only ``rows`` were
    searched; the other rows have no neighbours (-1 / -inf). For an incremental run: the pool's
    old faces were already compared with each other by the previous run, so only the new ones
    need a search, against the whole pool; :func:`cluster` treats edges as undirected, so the
    old faces still meet the new ones."""
    x = _as_f32(base)
    rows = np.asarray(rows, np.int64)
    sims = np.full((len(x), k), -np.inf, np.float32)
    idx = np.full((len(x), k), -1, np.int64)
    if len(rows) and len(x) > 1:
        kk = min(k + 1, len(x))
        s, i = knn(x, kk, x[rows], exact=exact, threads=threads)
        s, i = _drop_self(s, i, rows, kk - 1)
        sims[rows, : kk - 1], idx[rows, : kk - 1] = s, i
    return sims, idx


def knn_recall(idx_exact: np.ndarray, sims_exact: np.ndarray, idx_approx: np.ndarray,
               sims_approx: np.ndarray, *, tol: float = 1e-5) -> float:
    """Recall of an approximate kNN against the exact one, ties counted: the fraction of the
    exact top-k slots filled by an approximate neighbour at least as similar as the exact k-th
    one. (Many faces of one person are nearly equidistant, so which of several equally similar
    ids is returned does not matter; ``id_recall`` below counts ids only.)"""
    kth = sims_exact[:, -1:]
    valid = idx_exact >= 0
    good = (idx_approx >= 0) & (sims_approx >= kth - tol)
    return float(good.sum() / max(valid.sum(), 1))


def id_recall(idx_exact: np.ndarray, idx_approx: np.ndarray) -> float:
    """Fraction of exact neighbour ids that the approximate kNN returned."""
    k = idx_exact.shape[1]
    hit = (idx_exact[:, :, None] == idx_approx[:, None, :]).any(axis=2) & (idx_exact >= 0)
    return float(hit.sum() / max((idx_exact >= 0).sum(), 1)) if k else 1.0


def _knn_block_task(base, index_bytes, queries, lo, hi, k, self_knn, threads, nprobe, k_factor):
    """One Ray task: queries [lo, hi) (rows of base when self_knn) against the whole base."""
    x = base
    q = x[lo:hi] if self_knn else queries[lo:hi]
    index = load_index(index_bytes) if index_bytes is not None else build_search_index(x, exact=True,
                                                                                      threads=threads)
    _faiss(threads)
    kk = min(k + 1 if self_knn else k, len(x))
    sims, idx = search(index, q, kk, nprobe=nprobe, k_factor=k_factor)
    if self_knn:
        sims, idx = _drop_self(sims, idx, np.arange(lo, hi), kk - 1)
    return lo, sims, idx


def knn_distributed(base: np.ndarray, k: int, queries: np.ndarray | None = None, *,
                    exact: bool | None = None, block_rows: int = 100_000, threads: int | None = 1,
                    num_cpus: float = 1, max_in_flight: int | None = None,
                    index=None, nprobe: int = GRAPH_NPROBE,
                    k_factor: float = GRAPH_K_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` as Ray tasks over blocks of query rows (needs ``ray.init`` done by the caller).

    The base goes into the object store once (``ray.put``); for the approximate case the index
    is built once here (or ``index`` is used), serialised and put once too, so every task
    searches the same index and the result equals the in-process :func:`knn` over that index. Each task returns the
    top-k of its block; blocks are concatenated in query order."""
    import ray

    x = _as_f32(base)
    self_knn = queries is None
    q = None if self_knn else _as_f32(queries)
    nq = len(x) if self_knn else len(q)
    if exact is None:
        exact = len(x) <= EXACT_MAX
    if index is None and not exact:
        index = build_search_index(x, exact=False, threads=threads)
    index_ref = None if index is None else ray.put(save_index(index))
    base_ref = ray.put(x)
    q_ref = None if self_knn else ray.put(q)
    task = ray.remote(num_cpus=num_cpus)(_knn_block_task)
    sims = np.full((nq, k), -np.inf, np.float32)
    idx = np.full((nq, k), -1, np.int64)
    pending = []
    limit = max_in_flight or max(2, int(ray.available_resources().get("CPU", 2)) * 2)

    def collect(done):
        for lo, s, i in ray.get(done):
            sims[lo:lo + len(s), : s.shape[1]] = s
            idx[lo:lo + len(i), : i.shape[1]] = i

    for lo in range(0, nq, block_rows):
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            collect(done)
        pending.append(task.remote(base_ref, index_ref, q_ref, lo, min(lo + block_rows, nq), k, self_knn,
                                   threads, nprobe, k_factor))
    collect(pending)
    sims[idx < 0] = -np.inf
    return sims, idx


# ---------------------------------------------------------------------------------------------
# Clustering

def _dense(keys: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(keys).ravel(), return_inverse=True)[1].astype(np.int64)


def _segment_sum(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, sum of the rows of ``values`` per key): sort + np.add.reduceat (np.add.at
    is slow on 2-d float rows)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    if not len(sk):
        return sk, np.zeros((0,) + values.shape[1:], values.dtype)
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    return sk[starts], np.add.reduceat(values[order], starts, axis=0)


def _rowdot(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """sum(a[ia] * b[ib], axis=1) in chunks (float32)."""
    out = np.empty(len(ia), np.float32)
    for lo in range(0, len(ia), chunk):
        hi = lo + chunk
        out[lo:hi] = np.einsum("ij,ij->i", a[ia[lo:hi]], b[ib[lo:hi]])
    return out


def _best_per_source(src: np.ndarray, dst: np.ndarray, w: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For each node < m: the neighbour of highest weight (ties: lower id), -1 if none."""
    order = np.lexsort((dst, -w, src))
    s = src[order]
    first = np.ones(len(s), bool)
    first[1:] = s[1:] != s[:-1]
    best = np.full(m, -1, np.int64)
    bw = np.full(m, -np.inf, np.float32)
    best[s[first]] = dst[order][first]
    bw[s[first]] = w[order][first]
    return best, bw


def _clashes(group: np.ndarray, lab: np.ndarray, img: np.ndarray, multi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cannot-link clashes of a proposed multi-way merge. ``group[c]`` = the group cluster c
    would join (-1: none). Returns (part_a, part_b): pairs of clusters of one group that hold
    faces of one photo."""
    if not len(multi):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    fl = lab[multi]
    g = group[fl]
    sel = g >= 0
    if not sel.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = img[multi][sel] * len(group) + g[sel]
    part = fl[sel]
    order = np.lexsort((part, key))
    key, part = key[order], part[order]
    clash = (key[1:] == key[:-1]) & (part[1:] != part[:-1])
    return part[:-1][clash], part[1:][clash]


def cluster(embeddings: np.ndarray, image_keys: np.ndarray, *, threshold: float = CLUSTER_THRESHOLD,
            k: int = K, min_size: int = MIN_SIZE, names: np.ndarray | None = None,
            knn_graph: tuple[np.ndarray, np.ndarray] | None = None, exact: bool | None = None,
            threads: int | None = None, max_rounds: int = 200, stats: dict | None = None) -> np.ndarray:
    """Cluster faces into people: int64 label per face, -1 = no person (noise or too small).

    Average linkage (UPGMA on cosine) restricted to the kNN graph cut at ``threshold``, with
    cannot-link (never two faces of one photo, ``image_keys``) and name constraints (``names``:
    int per face, -1 = unlabelled; one name -> one cluster, never two names in one cluster).
    Clusters of fewer than ``min_size`` faces get -1 unless they carry a name. Labels are
    0..m-1 by decreasing size. ``knn_graph`` = (sims, idx) of :func:`knn` to reuse one."""
    x = _as_f32(embeddings)
    n = len(x)
    img = _dense(image_keys)
    if len(img) != n:
        raise ValueError("image_keys must have one entry per face")
    if n == 0:
        return np.zeros(0, np.int64)
    nm = np.full(n, -1, np.int64) if names is None else np.asarray(names, np.int64).ravel()
    if len(nm) != n:
        raise ValueError("names must have one entry per face")
    if knn_graph is None:
        knn_graph = knn(x, k, exact=exact, threads=threads)
    ksims, kidx = knn_graph

    # Edges: undirected kNN pairs with similarity >= threshold, not within one photo.
    rows = np.repeat(np.arange(n, dtype=np.int64), kidx.shape[1])
    cols = kidx.ravel().astype(np.int64)
    keep = (cols >= 0) & (ksims.ravel() >= threshold)
    rows, cols = rows[keep], cols[keep]
    keep = img[rows] != img[cols]
    lo, hi = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    e = np.unique(lo * n + hi)
    ea, eb = e // n, e % n

    # Clusters: start from one per face, faces of one name pre-merged (names win over photos).
    lab = np.arange(n, dtype=np.int64)
    labelled = np.flatnonzero(nm >= 0)
    if len(labelled):
        uniq_names, first, inv = np.unique(nm[labelled], return_index=True, return_inverse=True)
        lab[labelled] = labelled[first][inv]
    sums = np.zeros((n, x.shape[1]), np.float32)
    if len(labelled):
        u, ssum = _segment_sum(x, lab)
        sums[u] = ssum
    else:
        sums[:] = x
    count = np.bincount(lab, minlength=n).astype(np.int64)
    name_of = np.full(n, -1, np.int64)
    name_of[lab[labelled]] = nm[labelled]
    img_count = np.bincount(img)
    multi = np.flatnonzero(img_count[img] > 1)  # only faces sharing a photo can clash

    # Edge weights: average linkage = sum_a . sum_b / (n_a n_b)
    ea, eb = lab[ea], lab[eb]
    e = np.unique(np.minimum(ea, eb) * n + np.maximum(ea, eb))
    e = e[e // n != e % n]
    ea, eb = e // n, e % n
    w = _rowdot(sums, sums, ea, eb) / (count[ea] * count[eb]).astype(np.float32)
    rounds = merges = rejected = 0
    while len(ea) and rounds < max_rounds:
        keep = w >= threshold
        ea, eb, w = ea[keep], eb[keep], w[keep]
        if not len(ea):
            break
        rounds += 1
        best, _ = _best_per_source(np.concatenate([ea, eb]), np.concatenate([eb, ea]),
                                   np.concatenate([w, w]), n)
        cand = np.flatnonzero(best >= 0)
        core = cand[best[best[cand]] == cand]            # in a reciprocal best pair
        group = np.full(n, -1, np.int64)
        group[core] = np.minimum(core, best[core])
        # Stars: a cluster whose best partner is in a reciprocal pair joins that pair's merge.
        member = cand[(group[cand] < 0) & (group[best[cand]] >= 0)]
        group[member] = group[best[member]]
        is_core = np.zeros(n, bool)
        is_core[core] = True
        # Names: a member with a name joins only a core of the same name.
        gname = np.full(n, -1, np.int64)
        np.maximum.at(gname, group[core], name_of[core])
        core_names_differ = np.zeros(n, bool)
        core_names_differ[group[core]] = (name_of[core] >= 0) & (name_of[best[core]] >= 0) & (
            name_of[core] != name_of[best[core]])
        bad_member = member[(name_of[member] >= 0) & (name_of[member] != gname[group[member]])]
        group[bad_member] = -1
        # Cannot-link: members that clash are left out; cores that clash are a forbidden pair.
        pa, pb = _clashes(group, lab, img, multi)
        forbid = np.unique(np.concatenate([group[pa[is_core[pa] & is_core[pb]]], np.flatnonzero(core_names_differ)]))
        group[pa[~is_core[pa]]] = -1
        group[pb[~is_core[pb]]] = -1
        if len(forbid):
            rejected += len(forbid)
            fa = forbid
            fb = best[forbid]
            drop = np.isin(np.minimum(ea, eb) * n + np.maximum(ea, eb), np.minimum(fa, fb) * n + np.maximum(fa, fb))
            ea, eb, w = ea[~drop], eb[~drop], w[~drop]
            bad = np.zeros(n, bool)
            bad[forbid] = True
            group[(group >= 0) & bad[np.maximum(group, 0)]] = -1
        # Cohesion: a star merges only when the average similarity over all its cross-part face
        # pairs is >= threshold (multi-way average linkage); else only its reciprocal pair merges.
        parts = np.flatnonzero(group >= 0)
        if not len(parts):
            continue
        gp = group[parts]
        uniq_g, ginv = np.unique(gp, return_inverse=True)
        gs = _segment_sum(sums[parts], ginv)[1]
        gn = np.bincount(ginv, weights=count[parts]).astype(np.float64)
        self_dot = np.einsum("ij,ij->i", sums[parts], sums[parts]).astype(np.float64)
        self_n2 = count[parts].astype(np.float64) ** 2
        num = np.einsum("ij,ij->i", gs, gs) - np.bincount(ginv, weights=self_dot)
        den = gn ** 2 - np.bincount(ginv, weights=self_n2)
        weak = num / np.maximum(den, 1) < threshold
        if weak.any():
            drop_member = weak[ginv] & ~is_core[parts]
            group[parts[drop_member]] = -1
            parts = parts[~drop_member]
            gp = group[parts]
        nonroot = parts[parts != gp]
        roots = group[nonroot]
        merges += len(nonroot)
        newid = np.arange(n, dtype=np.int64)
        newid[nonroot] = roots
        ur, rs = _segment_sum(sums[nonroot], roots)
        sums[ur] += rs
        count += np.bincount(roots, weights=count[nonroot], minlength=n).astype(np.int64)
        count[nonroot] = 0
        np.maximum.at(name_of, roots, name_of[nonroot])
        lab = newid[lab]
        changed = np.zeros(n, bool)
        changed[roots] = True
        ea, eb = newid[ea], newid[eb]
        key = np.minimum(ea, eb) * n + np.maximum(ea, eb)
        selfloop = ea == eb
        key, w, ch = key[~selfloop], w[~selfloop], changed[ea[~selfloop]] | changed[eb[~selfloop]]
        # edges touching a merged cluster: recompute once per distinct pair
        kc = np.unique(key[ch])
        kk = key[~ch]
        ea = np.concatenate([kk // n, kc // n])
        eb = np.concatenate([kk % n, kc % n])
        wc = _rowdot(sums, sums, kc // n, kc % n) / (count[kc // n] * count[kc % n]).astype(np.float32)
        w = np.concatenate([w[~ch], wc])

    # Final labels: -1 for small unnamed clusters, 0.. by decreasing size.
    size = count[lab]
    ok = (size >= min_size) | (name_of[lab] >= 0)
    out = np.full(n, -1, np.int64)
    if ok.any():
        roots, inv = np.unique(lab[ok], return_inverse=True)
        order = np.lexsort((roots, -count[roots]))
        rank = np.empty(len(roots), np.int64)
        rank[order] = np.arange(len(roots))
        out[ok] = rank[inv]
    if stats is not None:
        stats.update(rounds=rounds, merges=merges, rejected_merges=rejected, clusters=int(out.max() + 1))
    return out


def cannot_link_violations(labels: np.ndarray, image_keys: np.ndarray) -> int:
    """Number of (photo, person) pairs with more than one face (labels -1 ignored)."""
    labels = np.asarray(labels)
    sel = labels >= 0
    key = np.stack([_dense(image_keys)[sel], labels[sel]], 1)
    _, c = np.unique(key, axis=0, return_counts=True)
    return int((c > 1).sum())


def centroids(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique labels >= 0 (int64, sorted), L2-normalised mean embedding per label (float32))."""
    x = _as_f32(embeddings)
    labels = np.asarray(labels, np.int64)
    sel = labels >= 0
    uniq, inv = np.unique(labels[sel], return_inverse=True)
    sums = _segment_sum(x[sel].astype(np.float64), inv)[1]
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return uniq, sums.astype(np.float32)


def assign(new_embeddings: np.ndarray, centroids: np.ndarray, threshold: float = ASSIGN_THRESHOLD, *,
           image_keys_new: np.ndarray | None = None, k: int = 1,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Assign new faces to existing persons: (row of ``centroids`` int64, -1 = none; cosine to that
    centroid float32, of the best person even when unassigned).

    A face goes to its most similar centroid when the cosine is >= ``threshold``. Cannot-link:
    of the new faces of one photo (``image_keys_new``) that would go to the same person, only
    the most similar one does; the others stay unassigned (for the pool)."""
    faiss = _faiss(threads)
    q = _as_f32(new_embeddings)
    c = _as_f32(centroids)
    if len(c) == 0 or len(q) == 0:
        return np.full(len(q), -1, np.int64), np.full(len(q), -np.inf, np.float32)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sims, idx = search(index, q, 1)
    sim, person = sims[:, 0], idx[:, 0].astype(np.int64)
    person = np.where(sim >= threshold, person, -1)
    if image_keys_new is not None:
        img = _dense(image_keys_new)
        sel = np.flatnonzero(person >= 0)
        order = sel[np.lexsort((-sim[sel], person[sel], img[sel]))]
        dup = np.zeros(len(order), bool)
        dup[1:] = (img[order][1:] == img[order][:-1]) & (person[order][1:] == person[order][:-1])
        person[order[dup]] = -1
    return person, sim
