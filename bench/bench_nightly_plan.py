"""A nightly run costs what changed: plan + publish against a large compacted index.

Builds (once, in --work) a synthetic compacted index: --rows images rows (10,000,000 by default)
sorted by image_id in files of 2,000,000 rows and row groups of 100,000 (what `facebatch compact`
writes), with a face (128-d embedding) for one image in --faces-every. Then a nightly SOURCE (a
Parquet manifest) lists every indexed object plus --new new ones, --changed of them with a new
ETag, and the benchmark measures, each step in a fresh process:

  plan     build_plan(...) (the published images are read by DuckDB under its memory limit)
  publish  publishing.publish_run(...) of a staged run of the planned objects (superseding included)

for changed objects `scattered` (uniformly over the archive) and `clustered` (one folder).
Reported: seconds, bytes the process read (rchar of /proc/self/io: every read() of the step, the
index's files and the run's own staged/spilled files), peak RSS of the process (VmHWM), and
the index's size. Finally it plans a --rows-object CSV.gz manifest against an empty OUT.

    .venv/bin/python bench/bench_nightly_plan.py --work /tmp/nightly-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib
from benchlib import REPO

VERSION = "v1-bench"
FILE_ROWS = 2_000_000
ROW_GROUP = 100_000


def _id_sql(expr: str) -> str:
    return f"'s3://archive/photos/' || lpad(({expr} // 1000)::VARCHAR, 5, '0') || '/IMG_' || lpad(({expr})::VARCHAR, 9, '0') || '.jpg'"


def generate(work: Path, rows: int, faces_every: int) -> None:
    import duckdb
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facebatch import tables

    index = work / "index"
    (index / "images").mkdir(parents=True)
    (index / "faces").mkdir(parents=True)
    con = duckdb.connect()
    rng = np.random.default_rng(0)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        stop = min(rows, start + FILE_ROWS)
        name = f"compact-bench-{part:05d}.parquet"
        images = con.execute(f"""
            SELECT {_id_sql('i')} AS image_id, {_id_sql('i')} AS uri, md5(i::VARCHAR) AS etag,
                   250000 + i % 1000 AS size_bytes, 1600 AS width, 1200 AS height, 'JPEG' AS format,
                   'ok' AS status, NULL::VARCHAR AS error, (i % {faces_every} = 0)::INT AS num_faces,
                   '{VERSION}' AS pipeline_version, 'compact-bench' AS run_id,
                   TIMESTAMPTZ '2026-01-01 00:00:00+00' AS indexed_at
            FROM range({start}, {stop}) t(i) ORDER BY i""").to_arrow_reader(ROW_GROUP)
        with pq.ParquetWriter(index / "images" / name, tables.IMAGES_SCHEMA, compression="zstd") as writer:
            for batch in images:
                writer.write_table(pa.Table.from_batches([batch]).cast(tables.IMAGES_SCHEMA), row_group_size=ROW_GROUP)
        ids = con.execute(f"SELECT {_id_sql('i')} FROM range({start}, {stop}) t(i) WHERE i % {faces_every} = 0 ORDER BY i").to_arrow_reader(ROW_GROUP)
        with pq.ParquetWriter(index / "faces" / name, tables.FACES_SCHEMA, compression="zstd") as writer:
            for batch in ids:
                m = batch.num_rows
                emb = rng.normal(size=(m, 128)).astype(np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                f32 = lambda v: pa.array(np.full(m, v, np.float32))  # noqa: E731
                table = pa.table({
                    "image_id": batch.column(0), "face_index": pa.array(np.zeros(m, np.int32)),
                    "box": pa.FixedSizeListArray.from_arrays(pa.array(rng.uniform(0, 1000, 4 * m).astype(np.float32)), 4),
                    "score": f32(0.99),
                    "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(rng.uniform(0, 1000, 10 * m).astype(np.float32)), 10),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 128),
                    "face_size": f32(80.0), "roll": f32(0.0), "yaw": f32(0.0), "sharpness": f32(100.0),
                    "pipeline_version": pa.array([VERSION] * m), "run_id": pa.array(["compact-bench"] * m),
                }).cast(tables.FACES_SCHEMA)
                writer.write_table(table, row_group_size=ROW_GROUP)
    # The manifest of the whole archive, for the 10M-object planning (CSV, gzipped), against an empty OUT.
    con.execute(f"COPY (SELECT {_id_sql('i')} AS uri, md5(i::VARCHAR) AS etag, 250000 AS size FROM range({rows}) t(i)) "
                f"TO '{work / 'archive.csv.gz'}' (FORMAT csv, HEADER, COMPRESSION gzip)")


def nightly_manifest(work: Path, rows: int, new: int, changed: int, layout: str) -> Path:
    import duckdb

    path = work / f"nightly-{layout}.parquet"
    if layout == "scattered":
        changed_ids = f"(SELECT i FROM range({rows}) t(i) ORDER BY hash(i) LIMIT {changed})"
    else:  # one folder of the archive, re-exported: consecutive ids in the middle of the archive
        changed_ids = f"(SELECT i FROM range({rows // 2}, {rows // 2 + changed}) t(i))"
    duckdb.connect().execute(f"""
        COPY (
          SELECT {_id_sql('i')} AS uri, CASE WHEN i IN {changed_ids} THEN 'changed' ELSE md5(i::VARCHAR) END AS etag,
                 250000 AS size FROM range({rows}) t(i)
          UNION ALL
          SELECT {_id_sql(f'i + {rows}')}, 'new', 250000 FROM range({new}) t(i)
        ) TO '{path}' (FORMAT parquet)""")
    return path


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(field + ":")).split()[1])


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss() -> int:
    # VmHWM: this process's resident high-water mark (not ru_maxrss, which Linux carries over
    # from the parent's image across fork + exec).
    return _status_kib("VmHWM") * 1024


def step(kind: str, source: str, out: str, run_id: str) -> dict:
    """One measured step, in this (fresh) process."""
    import pyarrow as pa

    from facebatch import publishing, tables, writing
    from facebatch.out import Out
    from facebatch.config import IndexConfig
    from facebatch.plan import build_plan

    location = Out.from_uri(out)
    result: dict = {}
    if kind == "plan":
        rss0, r0, t0, c0 = _status_kib('VmRSS') * 1024, _rchar(), time.perf_counter(), _cpu_seconds()
        plan = build_plan(IndexConfig(source=source, out=out).validate(), VERSION)
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0, read_bytes=_rchar() - r0, peak_rss=_peak_rss(), rss_before=rss0,
                      counts=plan.counts, todo=plan.num_todo)
        if run_id:
            # Stage the run the pipeline would write for the planned objects (not measured).
            from test_tables_plan import _faces_rows, _images_rows

            writer = writing.RunWriter(location, run_id)
            for batch in plan.batches(rows=10_000):
                ids = batch.column("image_id").to_pylist()
                writer.write("faces", _faces_rows(ids, VERSION, run_id).cast(tables.FACES_SCHEMA))
                writer.write("images", _images_rows(ids, ["x"] * len(ids), ["ok"] * len(ids), VERSION, run_id).cast(tables.IMAGES_SCHEMA))
            writer.close()
            writer.heartbeat.stop()
            writing.stage_replaced_ids(plan, VERSION, location, run_id)
        plan.cleanup()
    else:
        stats = publishing.SupersedeStats()
        rss0, r0, t0, c0 = _status_kib('VmRSS') * 1024, _rchar(), time.perf_counter(), _cpu_seconds()
        # publish_run as the pipeline calls it, with the supersede statistics it records.
        real = publishing.remove_superseded
        publishing.remove_superseded = lambda o, r, s=None: real(o, r, stats)  # noqa: E731
        publishing.publish_run(location, run_id, {"run_id": run_id})
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0, read_bytes=_rchar() - r0, peak_rss=_peak_rss(), rss_before=rss0,
                      rows_removed=stats.rows_removed, files_rewritten=stats.files_rewritten,
                      row_groups_probed=stats.row_groups_probed, row_groups_total=stats.row_groups_total)
    del pa
    return result


def run_step(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    done = subprocess.run([sys.executable, __file__, "--step", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"step {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def main() -> None:
    parser = benchlib.parser(__doc__, whole_doc=True)
    parser.add_argument("--work", default="/tmp/facebatch-nightly-bench")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=1_000)
    parser.add_argument("--faces-every", type=int, default=10)
    parser.add_argument("--layouts", default="clustered,scattered")
    parser.add_argument("--step", nargs=4, metavar=("KIND", "SOURCE", "OUT", "RUN_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        kind, source, out, run_id = args.step
        print(json.dumps(step(kind, source, out, run_id if run_id != "-" else "")))
        return

    work = Path(args.work)
    marker = work / f"generated-{args.rows}-{args.faces_every}"
    if not marker.exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        generate(work, args.rows, args.faces_every)
        marker.write_text("ok")
        print(f"generated the index in {time.perf_counter() - t0:.0f} s")
    index = work / "index"
    index_bytes = folder_bytes(index)
    print(f"index: {args.rows:,} images rows, {args.rows // args.faces_every:,} faces rows, "
          f"{index_bytes / 2**20:,.0f} MiB in {len(list(index.rglob('*.parquet')))} files; load: {os.getloadavg()}")
    gib = 2**30
    rows = []
    for layout in args.layouts.split(","):
        manifest = nightly_manifest(work, args.rows, args.new, args.changed, layout)
        out = work / f"out-{layout}"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["cp", "-al", str(index), str(out)], check=True)  # hard links: rewrites make new files
        plan = run_step("plan", str(manifest), str(out), "nightly-1")
        publish = run_step("publish", "-", str(out), "nightly-1")
        rows.append((layout, plan, publish))
        print(json.dumps({"layout": layout, "plan": plan, "publish": publish}))
        shutil.rmtree(out)
    empty = work / "out-empty"
    shutil.rmtree(empty, ignore_errors=True)
    full = run_step("plan", str(work / "archive.csv.gz"), str(empty), "-")
    print(json.dumps({"manifest_plan": full}))

    print()
    print(f"| step | changed | seconds | read (MiB) | read / index | driver peak RSS (GiB) | notes |")
    print(f"|---|---|---:|---:|---:|---:|---|")
    for layout, plan, publish in rows:
        print(f"| plan (manifest {args.rows + args.new:,} objects) | {layout} | {plan['seconds']:.1f} | "
              f"{plan['read_bytes'] / 2**20:,.0f} | {plan['read_bytes'] / index_bytes:.1%} | {plan['peak_rss'] / gib:.2f} | "
              f"{plan['counts']} |")
        print(f"| publish ({plan['todo']:,} rows) | {layout} | {publish['seconds']:.1f} | {publish['read_bytes'] / 2**20:,.0f} | "
              f"{publish['read_bytes'] / index_bytes:.1%} | {publish['peak_rss'] / gib:.2f} | "
              f"{publish['rows_removed']} rows removed, {publish['files_rewritten']} files rewritten, "
              f"{publish['row_groups_probed']}/{publish['row_groups_total']} row groups probed |")
    print(f"| plan ({args.rows:,}-object CSV.gz manifest, empty OUT) | - | {full['seconds']:.1f} | "
          f"{full['read_bytes'] / 2**20:,.0f} | - | {full['peak_rss'] / gib:.2f} | {full['counts']} |")
    print(f"\nindex {index_bytes / 2**20:,.0f} MiB; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
