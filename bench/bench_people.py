"""People benchmark on synthetic faces: full clustering, a nightly increment, search latency.

    python bench/bench_people.py                 # 1,000,000 faces (goals: <= 10 min, <= 6 GiB)
    python bench/bench_people.py --faces 100000  # smaller run

(a) full: kNN graph (faiss index build + self search) and clustering of N faces; seconds per
    stage, peak RSS of this process (psutil, sampled every 50 ms in a thread), BCubed and pairwise
    P/R/F against the synthetic people. Goal at 1M: <= 10 minutes, <= 6 GiB.
(b) increment: --new faces (whole new photos) onto the clustered N: assign to the persons'
    centroids, then cluster the pool (faces unassigned before + new faces not assigned) into new
    persons; the new faces are added to the search index too. Goal: <= 60 s for 10,000 onto 1M.
(c) search: the search index saved to disk and loaded; one query photo (--query-faces faces,
    top 20 each): median latency of 21 queries after the load, load time, index bytes.
    Goal: median <= 1 s.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

import benchlib

from bench.synthetic_people import generate  # noqa: E402
from facebatch import clustering as C  # noqa: E402
from facebatch.evaluation import bcubed, pairwise_f  # noqa: E402


class Clock:
    """Wall and CPU seconds of this process (CPU = all its threads: on a shared machine the
    wall time depends on the others' load, the CPU time much less)."""

    def __init__(self):
        self.w, self.c = time.perf_counter(), time.process_time()

    def __sub__(self, other: "Clock") -> "Lap":
        return Lap(self.w - other.w, self.c - other.c)


class Lap(float):
    def __new__(cls, wall: float, cpu: float):
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj

    def __add__(self, other):
        return Lap(float(self) + float(other), self.cpu + getattr(other, "cpu", 0.0))

    __radd__ = __add__

    def __format__(self, spec):
        return f"{format(float(self), spec)} s wall / {format(self.cpu, spec)} s cpu"


class PeakRSS:
    def __init__(self, interval: float = 0.05):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def reset(self):
        self.peak = self.proc.memory_info().rss

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def split_new(img: np.ndarray, n_new: int, seed: int) -> np.ndarray:
    """Boolean mask of the faces of whole random photos, about n_new faces."""
    rng = np.random.default_rng(seed + 99)
    photos = rng.permutation(np.unique(img))
    counts = np.bincount(np.searchsorted(np.unique(img), img))
    per = counts[np.searchsorted(np.unique(img), photos)]
    take = photos[: int(np.searchsorted(np.cumsum(per), n_new)) + 1]
    return np.isin(img, take)


def main() -> None:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--query-faces", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=C.K)
    ap.add_argument("--threshold", type=float, default=C.CLUSTER_THRESHOLD)
    ap.add_argument("--assign-threshold", type=float, default=C.ASSIGN_THRESHOLD)
    ap.add_argument("--min-size", type=int, default=C.MIN_SIZE)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--index-dir", default=None, help="where to save the search index (default: a temp dir)")
    args = ap.parse_args()

    rows: list[tuple[str, str]] = []

    def row(name, value):
        rows.append((name, value))
        print(f"  {name}: {value}", flush=True)

    print(f"load before: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)
    with PeakRSS() as rss:
        t0 = Clock()
        emb_all, person_all, img_all = generate(args.faces + args.new, args.seed)
        new = split_new(img_all, args.new, args.seed)
        emb, person, img = emb_all[~new], person_all[~new], img_all[~new]
        emb_new, person_new, img_new = emb_all[new], person_all[new], img_all[new]
        del emb_all
        row("generate", f"{Clock() - t0:.1f} ({len(emb):,} base faces, {len(emb_new):,} new, "
                        f"{len(np.unique(person)):,} people)")
        rss.reset()
        base_rss = rss.peak

        # (a) full clustering
        t0 = Clock()
        index = C.build_search_index(emb, threads=args.threads)
        t_build = Clock() - t0
        t0 = Clock()
        graph = C.knn(emb, args.k, index=index, threads=args.threads)
        t_knn = Clock() - t0
        t0 = Clock()
        st: dict = {}
        labels = C.cluster(emb, img, threshold=args.threshold, k=args.k, min_size=args.min_size,
                           knn_graph=graph, stats=st)
        t_cluster = Clock() - t0
        del graph
        bp, br, bf = bcubed(labels, person)
        pp, pr, pf = pairwise_f(labels, person)
        assert C.cannot_link_violations(labels, img) == 0
        row("(a) index build (faiss " + type(index).__name__ + ")", f"{t_build:.1f}")
        row("(a) knn self-search k=%d" % args.k, f"{t_knn:.1f}")
        row("(a) cluster", f"{t_cluster:.1f} ({st['rounds']} rounds, {st['clusters']:,} persons, "
                           f"{np.mean(labels < 0):.1%} faces unassigned)")
        row("(a) total knn+cluster", f"{t_build + t_knn + t_cluster:.1f}")
        row("(a) peak RSS", f"{rss.peak / 2**30:.2f} GiB (data alone {base_rss / 2**30:.2f} GiB)")
        row("(a) BCubed P/R/F", f"{bp:.4f} / {br:.4f} / {bf:.4f}")
        row("(a) pairwise P/R/F", f"{pp:.4f} / {pr:.4f} / {pf:.4f}")

        # (b) nightly increment
        rss.reset()
        t0 = Clock()
        uniq, cents = C.centroids(emb, labels)
        t_cent = Clock() - t0
        t1 = Clock()
        pidx, _ = C.assign(emb_new, cents, args.assign_threshold, image_keys_new=img_new, threads=args.threads)
        new_labels = np.where(pidx >= 0, uniq[np.maximum(pidx, 0)], -1)
        t_assign = Clock() - t1
        t1 = Clock()
        pool_old = np.flatnonzero(labels < 0)
        pool_new = np.flatnonzero(new_labels < 0)
        pool_emb = np.concatenate([emb[pool_old], emb_new[pool_new]])
        pool_img = np.concatenate([img[pool_old], img_new[pool_new]])
        # only the new pool faces need a search (against the whole pool); old-old pairs were
        # considered by the full run already
        pool_graph = C.knn_rows(pool_emb, np.arange(len(pool_old), len(pool_emb)), args.k, exact=True,
                                threads=args.threads)
        pool_lab = C.cluster(pool_emb, pool_img, threshold=args.threshold, k=args.k, min_size=args.min_size,
                             knn_graph=pool_graph)
        t_pool = Clock() - t1
        t1 = Clock()
        index.add(emb_new)
        t_add = Clock() - t1
        t_inc = Clock() - t0
        off = labels.max() + 1
        pool_lab = np.where(pool_lab >= 0, pool_lab + off, -1)
        labels_after = labels.copy()
        labels_after[pool_old] = pool_lab[: len(pool_old)]
        new_labels[pool_new] = pool_lab[len(pool_old):]
        inc_labels = np.concatenate([labels_after, new_labels])
        inc_person = np.concatenate([person, person_new])
        assert C.cannot_link_violations(inc_labels, np.concatenate([img, img_new])) == 0
        row("(b) increment total", f"{t_inc:.1f} (centroids {float(t_cent):.1f}, assign {float(t_assign):.1f}, "
                                   f"pool of {len(pool_emb):,} clustered {float(t_pool):.1f}, index add {float(t_add):.1f} s wall)")
        row("(b) new faces assigned to existing persons", f"{np.mean(pidx >= 0):.1%}; "
            f"new persons from the pool: {len(np.unique(pool_lab[pool_lab >= 0])):,}")
        row("(b) BCubed F after increment (all faces)", f"{bcubed(inc_labels, inc_person)[2]:.4f}; "
            f"new faces assigned to their person's majority cluster: "
            f"{np.mean(person_new[pidx >= 0] == _majority(labels, person, uniq)[pidx[pidx >= 0]]):.4f}")
        row("(b) peak RSS", f"{rss.peak / 2**30:.2f} GiB")

        # (c) search
        tmp = tempfile.TemporaryDirectory(dir=args.index_dir)
        path = Path(tmp.name) / "faces.faiss"
        t0 = Clock()
        C.save_index(index, path)
        t_save = Clock() - t0
        del index
        t0 = Clock()
        loaded = C.load_index(path)
        t_load = Clock() - t0
        rng = np.random.default_rng(7)
        lat = []
        for _ in range(21):
            q = emb[rng.choice(len(emb), args.query_faces, replace=False)]
            t0 = Clock()
            C.search(loaded, q, 20)
            lat.append(float(Clock() - t0))
        size = path.stat().st_size
        n_ix = loaded.ntotal
        row("(c) search index", f"{size / 2**20:.0f} MiB for {n_ix:,} faces ({size / n_ix * 1e6 / 2**20:.0f} MiB per million); "
                                f"save {float(t_save):.1f} s, load {float(t_load):.2f} s")
        row("(c) query latency (%d faces, top 20)" % args.query_faces,
            f"median {np.median(lat) * 1000:.1f} ms, max {np.max(lat) * 1000:.1f} ms")
        tmp.cleanup()
    print(f"load after: {os.getloadavg()}")
    print()
    print(f"| stage ({args.faces:,} faces) | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def _majority(labels: np.ndarray, person: np.ndarray, uniq: np.ndarray) -> np.ndarray:
    """The most frequent true person of each cluster label in uniq."""
    sel = labels >= 0
    key, cnt = np.unique(np.stack([labels[sel], person[sel]], 1), axis=0, return_counts=True)
    order = np.lexsort((-cnt, key[:, 0]))
    key = key[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:, 0] != key[:-1, 0]
    out = np.full(len(uniq), -1, np.int64)
    out[np.searchsorted(uniq, key[first, 0])] = key[first, 1]
    return out


if __name__ == "__main__":
    main()
