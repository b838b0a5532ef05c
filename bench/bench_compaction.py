"""DuckDB lookups and similarity search on a faces table before and after `facebatch compact`.

Builds a synthetic OUT with N faces spread over many nightly files (each night's file holds the
photos of that night: the image_id ranges of nights interleave, as they do when an archive's
folders all grow), then times, on fresh DuckDB connections:
  lookup      SELECT ... FROM faces WHERE image_id = ?           (one image's faces)
  similar     top-10 faces by cosine similarity to one embedding (full scan)
  per_image   faces per image for 1,000 image ids (IN list)
before and after compaction.

    .venv/bin/python bench/bench_compaction.py --faces 1000000 --nights 365
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import benchlib  # first: puts this checkout's facebatch on sys.path
from facebatch import tables  # noqa: E402
from facebatch.compact import compact  # noqa: E402
from facebatch.out import Out  # noqa: E402


def build(out: Path, faces: int, nights: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    images = faces // 3
    ids = np.array([f"s3://archive/photos/{i % 997:03d}/{i:09d}.jpg" for i in range(images)])
    order = np.argsort(ids)
    ids = ids[order]
    night_of = rng.integers(0, nights, size=images)
    faces_per_image = np.full(images, faces // images)
    faces_per_image[: faces - faces_per_image.sum()] += 1
    now = datetime.now(timezone.utc)
    for night in range(nights):
        sel = np.nonzero(night_of == night)[0]
        run_id = f"2026{night:04d}T000000Z-bench"
        img_ids = ids[sel]
        counts = faces_per_image[sel]
        n = len(sel)
        m = int(counts.sum())
        images_table = pa.table({
            "image_id": img_ids, "uri": img_ids, "etag": ["e"] * n, "size_bytes": np.full(n, 250_000),
            "width": np.full(n, 1600, np.int32), "height": np.full(n, 1200, np.int32), "format": ["JPEG"] * n,
            "status": ["ok"] * n, "error": pa.nulls(n, pa.string()), "num_faces": counts.astype(np.int32),
            "pipeline_version": ["v1-bench"] * n, "run_id": [run_id] * n, "indexed_at": [now] * n,
        }).cast(tables.IMAGES_SCHEMA)
        emb = rng.normal(size=(m, 128)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        face_ids = np.repeat(img_ids, counts)
        face_index = np.concatenate([np.arange(c) for c in counts]).astype(np.int32) if m else np.zeros(0, np.int32)
        faces_table = pa.table({
            "image_id": face_ids, "face_index": face_index,
            "box": pa.FixedSizeListArray.from_arrays(pa.array(rng.uniform(0, 1000, m * 4).astype(np.float32)), 4),
            "score": rng.uniform(0.9, 1, m).astype(np.float32),
            "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(rng.uniform(0, 1000, m * 10).astype(np.float32)), 10),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 128),
            "face_size": rng.uniform(20, 400, m).astype(np.float32), "roll": np.zeros(m, np.float32),
            "yaw": np.zeros(m, np.float32), "sharpness": np.full(m, 100, np.float32),
            "pipeline_version": ["v1-bench"] * m, "run_id": [run_id] * m,
        }).cast(tables.FACES_SCHEMA)
        for name, table in (("images", images_table), ("faces", faces_table)):
            (out / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / name / f"{run_id}.parquet", compression="zstd", row_group_size=50_000)
    return list(ids)


def time_queries(out: Path, ids: list[str], repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    probe = np.asarray(rng.normal(size=128), np.float32)
    probe /= np.linalg.norm(probe)
    faces = f"read_parquet('{out}/faces/*.parquet')"
    queries = {
        "lookup": (f"SELECT face_index, box, score FROM {faces} WHERE image_id = $1", lambda k: [ids[(k * 7919) % len(ids)]]),
        "similar": (
            f"SELECT image_id, array_cosine_similarity(embedding::FLOAT[128], $1::FLOAT[128]) AS sim FROM {faces} ORDER BY sim DESC LIMIT 10",
            lambda k: [probe.tolist()],
        ),
        "per_image": (
            f"SELECT image_id, count(*) FROM {faces} WHERE image_id IN (SELECT unnest($1::VARCHAR[])) GROUP BY 1",
            lambda k: [ids[k * 1000 : k * 1000 + 1000]],
        ),
    }
    result = {}
    for name, (sql, params) in queries.items():
        samples = []
        for k in range(repeats):
            con = duckdb.connect()
            con.execute("SET threads=2")
            t0 = time.perf_counter()
            con.execute(sql, params(k)).fetchall()
            samples.append(time.perf_counter() - t0)
            con.close()
        result[name] = statistics.median(samples) * 1000
    return result


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", help="build OUT here and keep it (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.keep or tempfile.mkdtemp(prefix="facebatch-bench-compact-"))
    t0 = time.perf_counter()
    ids = build(out, args.faces, args.nights)
    build_s = time.perf_counter() - t0
    files_before = len(list((out / "faces").glob("*.parquet")))
    before = time_queries(out, ids, args.repeats)
    t0 = time.perf_counter()
    report = compact(Out.from_uri(str(out)))
    compact_s = time.perf_counter() - t0
    files_after = len(list((out / "faces").glob("*.parquet")))
    after = time_queries(out, ids, args.repeats)
    print(f"faces table: {args.faces:,} faces, {len(ids):,} images; built in {build_s:.1f} s; compaction {compact_s:.1f} s")
    print(f"{'query (median ms, fresh connection)':38s} {'before: ' + str(files_before) + ' files':>18s} {'after: ' + str(files_after) + ' files':>16s} {'speed-up':>9s}")
    for name in before:
        print(f"{name:38s} {before[name]:18.1f} {after[name]:16.1f} {before[name] / after[name]:8.1f}x")
    print(report)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
