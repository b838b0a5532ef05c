"""`facebatch compact OUT`: merge many small per-run files into few large files sorted by image_id.

Nightly runs leave one small file per table per night; lookups then open every file. Compaction
rewrites each table as files of about `target_rows` rows, globally sorted by image_id, so each file
and each row group covers a narrow image_id range and DuckDB/Athena/Spark skip nearly all of them.

Protocol (under OUT's lease, so no indexing or people run writes meanwhile), the journaled swap
of facebatch/swap.py:
1. the merged files are written under OUT/_staging/compact-<id>/ (invisible to *.parquet globs);
2. a journal (compact.json) lists the files to add and the files to remove;
3. the swap: each new file is moved in (one atomic step each), then the old files are deleted.
A crash at any point is finished (journal complete) or discarded (no journal) by the next
`compact`, `index` or `people` run (recovery.py). During the swap itself (milliseconds locally, one server-side copy per
file on S3) a reader may see old and new files together; the journal makes that state transient.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import duckdb
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage, swap, tables
from .config import ConfigError
from .lease import Lease
from .out import Heartbeat, Out
from .recovery import recover_staging

SORT_KEYS = {"images": "image_id, pipeline_version", "faces": "image_id, pipeline_version, face_index"}



def finish_compaction(out: Out, compaction_id: str, heartbeat: Heartbeat | None = None) -> bool:
    """Complete a journaled compaction swap (idempotent). Returns False when there is no journal."""
    return swap.finish_swap(out, swap.COMPACTION, compaction_id, heartbeat)


def _holds_an_index(out: Out) -> bool:
    """Anything an indexing run leaves: published tables, run records or staged runs."""
    for folder in ("images", "faces", "_runs", "_staging"):
        location = out.join(folder)
        try:
            if out.fs.get_file_info(pafs.FileSelector(location.fs_path(), allow_not_found=True)):
                return True
        except OSError as exc:
            raise storage.storage_error("LIST", location.uri(), exc) from exc
    return False


def compact(out: Out, target_rows: int = 2_000_000, row_group_size: int = 100_000) -> dict[str, Any]:
    if not _holds_an_index(out):
        raise ConfigError(f"{out.given} holds no facebatch index (no images/, faces/, _runs/ or _staging/ in it): "
                          "give the --out of `facebatch index`")
    compaction_id = "compact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    # One writer per OUT: no indexing or people run publishes while the files are merged and swapped.
    with Lease(out, holder=f"facebatch compact {compaction_id}") as lease:
        return _compact(out, compaction_id, target_rows, row_group_size, lease)


def _compact(out: Out, compaction_id: str, target_rows: int, row_group_size: int, lease) -> dict[str, Any]:
    recover_staging(out)
    # Like an indexing run, a compaction heartbeats its staging folder so that no run started
    # meanwhile takes it for a crash's leftovers.
    heartbeat = Heartbeat.start(out, compaction_id)
    journal: dict[str, list] = {"add": [], "remove": []}
    report: dict[str, Any] = {"compaction_id": compaction_id, "tables": {}}
    t0 = time.perf_counter()
    try:
        for name, schema in tables.TABLES.items():
            try:
                _merge_table(out, name, schema, compaction_id, target_rows, row_group_size, journal, report)
            except (OSError, duckdb.Error) as exc:
                # A failed read or write of a table file: nothing was swapped yet; the staging folder
                # (no journal) is discarded by the next run.
                raise storage.StorageError(f"compaction {compaction_id}: merging {name} failed: {exc}") from exc
        if journal["add"] or journal["remove"]:
            lease.check()
            swap.write_journal(out, swap.COMPACTION, compaction_id, journal)
            # On success this removes the staging folder; on failure the journal stays for recovery.
            finish_compaction(out, compaction_id, heartbeat)
        else:
            heartbeat.stop()
            out.discard_staged(compaction_id)
    except OSError as exc:  # the journal's PUT, or a HEAD while checking the merged files
        raise storage.StorageError(f"compaction {compaction_id}: {exc}") from exc
    finally:
        # Whatever failed, nothing keeps beating for a compaction that is over.
        heartbeat.stop()
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _merge_table(out: Out, name: str, schema, compaction_id: str, target_rows: int,
                 row_group_size: int, journal: dict[str, list], report: dict[str, Any]) -> None:
    """Write one table's rows, sorted, as staged part files; add them (and the files they replace) to the journal."""
    files = out.list_table_files(name)
    if len(files) <= 1:
        report["tables"][name] = {"files_before": len(files), "files_after": len(files), "rows": None, "skipped": True}
        return
    con = duckdb.connect()
    try:
        con.execute("SET preserve_insertion_order=true")
        con.register("source_rows", pads.dataset(files, schema=schema, filesystem=out.fs, format="parquet"))
        reader = con.execute(f"SELECT * FROM source_rows ORDER BY {SORT_KEYS[name]}").to_arrow_reader(row_group_size)
        part, rows_in_part, total = 0, 0, 0
        writer = None
        staged_dir = out.staging(compaction_id, name)
        out.ensure_parent_dir(staged_dir.join("part").fs_path())
        for batch in reader:
            if writer is None or rows_in_part >= target_rows:
                if writer is not None:
                    writer.close()
                staged = staged_dir.join(f"part-{part:05d}.parquet")
                final = out.join(name, f"{compaction_id}-{part:05d}.parquet")
                journal["add"].append({"staged": staged.fs_path(), "final": final.fs_path()})
                writer = pq.ParquetWriter(staged.fs_path(), schema, filesystem=out.fs, compression="zstd", write_statistics=True)
                part, rows_in_part = part + 1, 0
            writer.write_batch(batch.cast(schema) if batch.schema != schema else batch, row_group_size=row_group_size)
            rows_in_part += batch.num_rows
            total += batch.num_rows
        if writer is not None:
            writer.close()
    finally:
        con.close()
    journal["remove"].extend(files)
    report["tables"][name] = {"files_before": len(files), "files_after": part, "rows": total}
