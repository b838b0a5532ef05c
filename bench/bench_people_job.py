"""The whole people job (`facebatch.people.run_people`) on a synthetic index: a full run, a nightly
increment, and search, with the seconds of every stage and the process's peak memory.

    .venv/bin/python bench/bench_people_job.py [--faces 1000000] [--new 10000] [--out /tmp/people-bench]

The index holds `--faces` faces drawn by bench/synthetic_people.py (persons with a heavy-tailed
number of faces, same/different-person similarities fitted to the shared pairs), written as the
index's own `images` and `faces` Parquet tables; the increment adds `--new` faces of new photos
as a second index run. Prints one table: stage seconds of the full run and of the increment,
BCubed F of both against the synthetic persons, the search index's size and load time, and the
median latency of one query photo (3 faces) after loading.
"""

from __future__ import annotations

import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import benchlib

from facebatch import evaluation, tables  # noqa: E402
from facebatch.people import PeopleConfig, SearchIndex, run_people  # noqa: E402
from synthetic_people import generate  # noqa: E402

VERSION = "v1-synthetic"


class PeakRSS:
    """Samples this process's resident memory every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def write_index_run(out: Path, run_id: str, embeddings: np.ndarray, image_keys: np.ndarray) -> None:
    """One index run's images + faces files for these faces (sorted by image_id, as the index writes them)."""
    order = np.lexsort((np.arange(len(image_keys)), image_keys))
    keys, emb = image_keys[order], embeddings[order]
    image_ids = np.char.add(np.char.add("s3://bench/photos/", np.char.zfill(keys.astype(str), 9)), ".jpg")
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(keys)])
    face_index = (np.arange(len(keys)) - np.repeat(starts, counts)).astype(np.int32)
    n = len(keys)
    faces = pa.table({
        "image_id": pa.array(image_ids.tolist(), pa.string()),
        "face_index": face_index,
        "box": pa.FixedSizeListArray.from_arrays(pa.array(np.tile([10, 10, 110, 130], n).astype(np.float32)), 4),
        "score": pa.array(np.full(n, 0.999, np.float32)),
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10 * n, np.float32)), 10),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), tables.EMBEDDING_DIM),
        "face_size": pa.array(np.full(n, 100, np.float32)),
        "roll": pa.array(np.zeros(n, np.float32)),
        "yaw": pa.array(np.zeros(n, np.float32)),
        "sharpness": pa.array(np.full(n, 100, np.float32)),
        "pipeline_version": pa.array([VERSION] * n),
        "run_id": pa.array([run_id] * n),
    }).cast(tables.FACES_SCHEMA)
    m = len(starts)
    images = pa.table({
        "image_id": pa.array(image_ids[starts].tolist(), pa.string()),
        "uri": pa.array(image_ids[starts].tolist(), pa.string()),
        "etag": pa.array(["e"] * m), "size_bytes": pa.array(np.full(m, 1 << 20)), "width": pa.array(np.full(m, 640, np.int32)),
        "height": pa.array(np.full(m, 480, np.int32)), "format": pa.array(["JPEG"] * m), "status": pa.array(["ok"] * m),
        "error": pa.nulls(m, pa.string()), "num_faces": pa.array(counts.astype(np.int32)),
        "pipeline_version": pa.array([VERSION] * m), "run_id": pa.array([run_id] * m),
        "indexed_at": pa.array([datetime.now(timezone.utc)] * m, pa.timestamp("us", tz="UTC")),
    }).cast(tables.IMAGES_SCHEMA)
    for name, table in (("faces", faces), ("images", images)):
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / name / f"{run_id}.parquet", row_group_size=50_000, compression="zstd")


def bcubed_f(out: Path, truth_of: dict) -> float:
    from facebatch.query import connect

    rows = connect(str(out)).execute("SELECT image_id, face_index, person_id FROM face_people").fetchall()
    persons = {p: i for i, p in enumerate(sorted({r[2] for r in rows if r[2]}))}
    pred = np.array([persons[r[2]] if r[2] else -1 for r in rows])
    true = np.array([truth_of[(r[0], r[1])] for r in rows])
    return evaluation.bcubed(pred, true)[2]


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/facebatch-people-bench"))
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)

    t0 = time.perf_counter()
    emb, person, image_keys = generate(args.faces + args.new, seed=0)
    # Whole photos go to one night: the photos holding the last `--new` faces (by photo) come later.
    photo_order = np.argsort(image_keys, kind="stable")
    cut_key = image_keys[photo_order[args.faces]]
    first = image_keys < cut_key
    write_index_run(args.out, "index-night-1", emb[first], image_keys[first])
    generated_s = time.perf_counter() - t0
    order = lambda sel: np.lexsort((np.arange(sel.sum()), image_keys[sel]))  # noqa: E731

    def truth(sel):
        keys, persons = image_keys[sel][order(sel)], person[sel][order(sel)]
        starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
        face_index = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
        return {(f"s3://bench/photos/{k:09d}.jpg", int(i)): int(p) for k, i, p in zip(keys, face_index, persons)}

    with PeakRSS() as full_mem:
        full = run_people(PeopleConfig(out=str(args.out), knn="local"))
    full_f = bcubed_f(args.out, truth(first))
    write_index_run(args.out, "index-night-2", emb[~first], image_keys[~first])
    with PeakRSS() as inc_mem:
        increment = run_people(PeopleConfig(out=str(args.out), knn="local"))
    inc_f = bcubed_f(args.out, truth(np.ones(len(person), bool)))

    t0 = time.perf_counter()
    index = SearchIndex.load(str(args.out))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    latencies = []
    for _ in range(args.queries):
        probe = emb[rng.choice(len(emb), 3, replace=False)]
        t0 = time.perf_counter()
        index.query(probe, top_k=20)
        latencies.append(time.perf_counter() - t0)
    index_bytes = sum(p.stat().st_size for p in (args.out / "_search").glob("*.faiss"))

    print(f"synthetic index: {first.sum():,} faces + {(~first).sum():,} new ({generated_s:.1f} s to generate and write)")
    print(f"{'':28} {'full run':>10} {'increment':>10}")
    stages = sorted(set(full.record["seconds"]) | set(increment.record["seconds"]), key=lambda s: (s == "total", s))
    for stage in stages:
        a, b = full.record["seconds"].get(stage), increment.record["seconds"].get(stage)
        print(f"{stage + ' s':28} {a if a is None else round(a, 2)!s:>10} {b if b is None else round(b, 2)!s:>10}")
    print(f"{'peak RSS GiB':28} {full_mem.peak / 2**30:>10.2f} {inc_mem.peak / 2**30:>10.2f}")
    print(f"{'persons':28} {full.record['faces']['persons']:>10,} {increment.record['faces']['persons']:>10,}")
    print(f"{'BCubed F':28} {full_f:>10.4f} {inc_f:>10.4f}")
    print(f"increment: {increment.record['faces']['new_faces']:,} new faces, {increment.record['faces']['assigned_to_existing']:,} "
          f"joined existing persons, {increment.record['faces']['new_persons']:,} new persons")
    print(f"search index: {index_bytes / 2**20:.1f} MiB for {len(emb):,} faces ({index_bytes / len(emb) * 1e6 / 2**20:.0f} MiB per million), "
          f"load {load_s:.2f} s, one photo (3 faces, top 20): median {1000 * np.median(latencies):.1f} ms, "
          f"max {1000 * np.max(latencies):.1f} ms")


if __name__ == "__main__":
    main()
