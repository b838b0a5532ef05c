"""Publishing an index run: its staged files become the tables' new state, all at once.

A run's rows were streamed into OUT/_staging/<run_id>/ (writing.py) and committed by its staged
record (READY + record.json). `publish_run` then, idempotently:

1. removes from older published files the rows this run replaces or prunes (`remove_superseded`),
   writing each touched file under a new key and deleting the old key after it;
2. moves faces, then images, into their table folders (one atomic step each: a rename locally, a
   server-side copy on S3, whose object appears whole or not at all), so an images row is never
   visible before its faces;
3. writes the run record OUT/_runs/<run_id>.json, then deletes the staging folder.

A crash or a storage error at any step leaves READY + record.json, and the next run's recovery
(recovery.py) calls `publish_run` again. See ARCHITECTURE.md for the states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .out import Heartbeat, Out, fault_point

def _read_ids(out: Out, location: storage.Location, columns: list[str]) -> pa.Table | None:
    try:
        return pq.read_table(location.fs_path(), columns=columns, filesystem=out.fs)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage.storage_error("read", location.uri(), exc) from exc


def _sorted_unique(values: pa.Array) -> list[str]:
    return sorted(set(values.to_pylist()))


def _candidates(ids: list[str], lo: str | None, hi: str | None) -> bool:
    """Does the sorted list `ids` hold a value in [lo, hi]? (None bounds: statistics missing.)"""
    import bisect

    if not ids:
        return False
    if lo is None or hi is None:
        return True
    i = bisect.bisect_left(ids, lo)
    return i < len(ids) and ids[i] <= hi


def rewritten_name(name: str, run_id: str) -> str:
    """The new key of a file rewritten by run `run_id`: never the old key (see remove_superseded).
    Names stay unique (the old name is unique in its folder, the run id among runs) and short."""
    stem = name[: -len(".parquet")]
    if len(stem) > 120:
        import hashlib

        stem = stem[:40] + "-" + hashlib.sha1(stem.encode()).hexdigest()[:12]
    return f"{stem}-r{run_id}.parquet"


@dataclass
class SupersedeStats:
    rows_removed: int = 0
    files_rewritten: int = 0
    files_deleted: int = 0
    row_groups_probed: int = 0
    row_groups_total: int = 0


def remove_superseded(out: Out, run_id: str, stats: SupersedeStats | None = None) -> int:
    """Remove from older published files the rows this staged run replaces or prunes.

    Runs before the run's own files are published, so a reader never sees two versions of an
    image for one pipeline version (for a moment it may see neither). Cost is what changed, not
    what exists:
    - only replaced ids (changed / retried / --full rows, staged in replaced.parquet) and pruned
      ids are looked for, never new ones;
    - a file is opened by its footer; only row groups whose image_id statistics [min, max] can hold
      one of those ids are probed, reading the image_id and pipeline_version columns alone;
    - only files where the probe finds rows are rewritten (whole: Parquet has no partial rewrite).
    A rewritten file is written whole under the run's staging folder, then moved to a NEW name
    (`<old-stem>-r<run_id>.parquet`), and the old file is deleted after it: a published object is
    never overwritten while readers may be scanning it, and the new name never holds a partial
    file. A crash between the move and the DELETE leaves both until the next run's recovery
    republishes this run, which finds the new file in place and deletes the old one (the views
    read only the new one meanwhile). The whole step is idempotent. Returns the number of rows removed.
    """
    stats = stats if stats is not None else SupersedeStats()
    staged_images = out.staged_table(run_id, "images")
    replaced = _read_ids(out, out.replaced_ids(run_id), ["image_id", "pipeline_version"])
    if replaced is None:
        replaced = _read_ids(out, staged_images, ["image_id", "pipeline_version"])
        if replaced is None:
            return 0  # already published: its supersede step ran before
    elif out.num_rows(staged_images) is None:
        return 0  # already published
    pruned_table = _read_ids(out, out.pruned_ids(run_id), ["image_id"])
    pruned = _sorted_unique(pruned_table["image_id"]) if pruned_table is not None else []
    replaced_keys = set(zip(replaced["image_id"].to_pylist(), replaced["pipeline_version"].to_pylist()))
    replaced_ids = sorted({i for i, _ in replaced_keys})
    del replaced
    if not replaced_ids and not pruned:
        return 0
    for name in ("images", "faces"):
        for path in out.list_table_files(name):
            base = path.rsplit("/", 1)[1]
            if base == f"{run_id}.parquet":
                continue
            stats.rows_removed += _supersede_file(out, run_id, name, path, replaced_ids, replaced_keys, pruned, stats)
    return stats.rows_removed


def _supersede_file(out: Out, run_id: str, name: str, path: str,
                    replaced_ids: list[str], replaced_keys: set, pruned: list[str], stats: SupersedeStats) -> int:
    uri = out.uri_of(path)
    try:
        parquet = pq.ParquetFile(path, filesystem=out.fs)
    except FileNotFoundError:
        return 0  # deleted meanwhile by an earlier attempt of this step
    except OSError as exc:
        raise storage.storage_error("read footer of", uri, exc) from exc
    meta = parquet.metadata
    id_col = parquet.schema_arrow.get_field_index("image_id")
    stats.row_groups_total += meta.num_row_groups
    probe = []
    for i in range(meta.num_row_groups):
        st = meta.row_group(i).column(id_col).statistics
        lo, hi = (st.min, st.max) if st is not None and st.has_min_max else (None, None)
        if _candidates(replaced_ids, lo, hi) or _candidates(pruned, lo, hi):
            probe.append(i)
    if not probe:
        return 0
    stats.row_groups_probed += len(probe)
    pruned_set = set(pruned)

    def mask_of(ids: list, versions: list) -> list[bool]:
        return [(i, v) in replaced_keys or i in pruned_set for i, v in zip(ids, versions)]

    try:
        hits = {}
        for i in probe:
            keys = parquet.read_row_group(i, columns=["image_id", "pipeline_version"])
            mask = mask_of(keys["image_id"].to_pylist(), keys["pipeline_version"].to_pylist())
            if any(mask):
                hits[i] = pa.array(mask, pa.bool_())
        if not hits:
            return 0
        removed = sum(pc.sum(m).as_py() for m in hits.values())
        kept_rows = meta.num_rows - removed
        if kept_rows == 0:
            out.delete_file(path)
            stats.files_deleted += 1
            return removed
        folder, base = path.rsplit("/", 1)
        final = out.at_fs_path(f"{folder}/{rewritten_name(base, run_id)}")
        if out.file_type(final.fs_path()) == pafs.FileType.File:
            # An earlier attempt moved the rewrite into place (a move makes it appear whole) and was
            # cut off before deleting the old file: only that delete is left to do.
            stats.files_rewritten += 1
            out.delete_file(path)
            return removed
        # Written under staging, then moved: readers take the new key instead of the old file as
        # soon as it exists, so it must never exist truncated. (Writing it in place on S3 did: when
        # reading the old file failed midway, closing the writer completed the upload of what had
        # been written so far.)
        staged = out.staging(run_id, f"rewrite-{name}-{final.path.rsplit('/', 1)[1]}")
        out.ensure_parent_dir(staged.fs_path())
        row_group_rows = meta.row_group(0).num_rows
        with pq.ParquetWriter(staged.fs_path(), parquet.schema_arrow, filesystem=out.fs, compression="zstd",
                              write_statistics=True) as writer:
            # One row group at a time: memory is one row group, whatever the file's size.
            for i in range(meta.num_row_groups):
                group = parquet.read_row_group(i)
                if i in hits:
                    group = group.filter(pc.invert(hits[i]))
                if group.num_rows:
                    writer.write_table(group, row_group_size=row_group_rows)
    except OSError as exc:
        raise storage.storage_error(f"rewrite ({name} without superseded rows)", uri, exc) from exc
    out.move(staged, final)
    stats.files_rewritten += 1
    out.delete_file(path)
    return removed


def publish_run(out: Out, run_id: str, record: dict[str, Any], heartbeat: Heartbeat | None = None) -> None:
    """Make a staged run visible (faces, then images), then write its run record. Idempotent.

    The run's heartbeat (when given) keeps beating while it publishes, so that no other run takes
    a slow publish for an abandoned one; it stops just before the staging folder is deleted."""
    supersede = SupersedeStats()
    remove_superseded(out, run_id, supersede)
    record = dict(record, superseded_rows_removed=supersede.rows_removed,
                  superseded_files_rewritten=supersede.files_rewritten,
                  superseded_row_groups_probed=supersede.row_groups_probed)
    fault_point("publish-after-supersede")
    for name in ("faces", "images"):
        staged = out.staged_table(run_id, name)
        if out.num_rows(staged) == 0:
            continue  # nothing new (a quiet night): no empty files in the table folders
        out.move(staged, out.table_file(name, run_id))
        fault_point(f"publish-after-{name}")
    record = dict(record, state="published", published_at=time.time())
    out.write_json(out.run_record(run_id), record)
    if heartbeat is not None:
        heartbeat.stop()
    out.delete_tree(out.staging(run_id))


