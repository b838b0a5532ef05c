"""The table contract (Arrow schemas of `images` and `faces`) and the write/publish protocol.

Layout of OUT (a local directory or s3://bucket/prefix):

    OUT/images/<run_id>.parquet      one file per table per run (compaction merges them)
    OUT/faces/<run_id>.parquet
    OUT/_runs/<run_id>.json          the run record, written after both tables are published
    OUT/_staging/<run_id>/...        a run's files while it is writing; never matched by *.parquet globs

A run streams its rows, already sorted by image_id, into staged files; publishing moves each
staged file to its table folder with one atomic step (a rename locally, a server-side copy on S3,
whose object appears whole or not at all). `faces` is published before `images`, so an images row
is visible only once its faces are. A reader that globs OUT/faces/*.parquet therefore never sees a
partial run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .config import ConfigError, check_run_id
from .out import Heartbeat, Out, fault_point, is_live

EMBEDDING_DIM = 128

IMAGE_STATUSES = ("ok", "not_image", "unsupported_format", "corrupt", "truncated", "too_large", "fetch_failed", "failed")

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32()),  # after EXIF orientation; null when the image could not be decoded
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # detected from content (JPEG, PNG, ...), not from the extension
        pa.field("status", pa.string(), nullable=False),  # one of IMAGE_STATUSES
        pa.field("error", pa.string()),  # readable message when status != 'ok'
        pa.field("num_faces", pa.int32()),  # null when status != 'ok'
        pa.field("pipeline_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

FACES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),  # 0 = highest detection score in the image
        pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in pixels of the oriented original
        pa.field("score", pa.float32()),
        pa.field("landmarks", pa.list_(pa.float32(), 10)),  # x,y of left eye, right eye, nose, left/right mouth
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),  # L2-normalised; cosine = dot product
        pa.field("face_size", pa.float32()),  # shorter box side in original pixels
        pa.field("roll", pa.float32()),  # degrees, eye line vs horizontal
        pa.field("yaw", pa.float32()),  # -1..1: nose offset from the eyes' midline / half eye distance
        pa.field("sharpness", pa.float32()),  # variance of the Laplacian of the aligned grey chip
        pa.field("pipeline_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TABLES = {"images": IMAGES_SCHEMA, "faces": FACES_SCHEMA}


def empty_table(name: str) -> pa.Table:
    return TABLES[name].empty_table()


@dataclass
class StagedTable:
    name: str
    fs_path: str
    writer: pq.ParquetWriter
    rows: int = 0
    last_id: str | None = None


@dataclass
class RunWriter:
    """Streams a run's rows into one staged Parquet file per table, sorted by image_id.

    Rows must arrive in image_id order (the pipeline preserves the plan's order); this is
    checked, because the row-group statistics that make lookups cheap rely on it.
    """

    out: Out
    run_id: str
    row_group_size: int = 50_000
    staged: dict[str, StagedTable] = field(default_factory=dict)
    _buffers: dict[str, list[pa.Table]] = field(default_factory=dict)
    _buffered_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        # The heartbeat comes first: a staging folder without one looks abandoned to other runs.
        self.heartbeat = Heartbeat.start(self.out, self.run_id)
        try:
            self._open_writers()
        except BaseException:
            self.heartbeat.stop()  # what was staged is left for recovery to discard
            raise

    def _open_writers(self) -> None:
        for name, schema in TABLES.items():
            path = self.out.staged_table(self.run_id, name).fs_path()
            self.out.ensure_parent_dir(path)
            writer = pq.ParquetWriter(
                path,
                schema,
                filesystem=self.out.fs,
                compression="zstd",
                write_statistics=True,
                # Embeddings are incompressible floats; dictionary pages would only cost time.
                use_dictionary=["uri", "status", "format", "pipeline_version", "run_id", "error"]
                if name == "images"
                else ["pipeline_version", "run_id"],
            )
            self.staged[name] = StagedTable(name, path, writer)
            self._buffers[name] = []
            self._buffered_rows[name] = 0

    def write(self, name: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(TABLES[name].names).cast(TABLES[name])
        ids = table.column("image_id").to_pylist()
        staged = self.staged[name]
        first = ids[0]
        if staged.last_id is not None and first < staged.last_id:
            raise RuntimeError(f"{name} rows arrived out of image_id order ({first!r} after {staged.last_id!r})")
        staged.last_id = ids[-1]
        self._buffers[name].append(table)
        self._buffered_rows[name] += table.num_rows
        if self._buffered_rows[name] >= self.row_group_size:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if not self._buffers[name]:
            return
        table = pa.concat_tables(self._buffers[name])
        self.staged[name].writer.write_table(table, row_group_size=self.row_group_size)
        self.staged[name].rows += table.num_rows
        self._buffers[name] = []
        self._buffered_rows[name] = 0

    def close(self) -> dict[str, int]:
        for name in self.staged:
            self._flush(name)
            self.staged[name].writer.close()
        # The READY marker says both staged files are complete: a crash after this point is
        # finished by the next run's recovery instead of discarded.
        ready = self.out.ready_marker(self.run_id).fs_path()
        with self.out.fs.open_output_stream(ready) as fh:
            fh.write(json.dumps({name: s.rows for name, s in self.staged.items()}).encode())
        return {name: s.rows for name, s in self.staged.items()}

    def abort(self) -> None:
        """Give up this run: stop beating and delete what it staged (nothing of it was visible)."""
        for staged in self.staged.values():
            try:
                staged.writer.close()
            except OSError:
                pass  # the folder is deleted below; recovery discards it should that fail too
        self.heartbeat.stop()
        self.out.delete_tree(self.out.staging(self.run_id))


# What a run replaces, staged beside its files by the driver (image_id + pipeline_version of every
# row it wrote for an object that already had one: changed, retried or --full; never new objects,
# which no older file can hold). Without it (a run staged by an older facebatch), every staged
# image id is looked for.
REPLACED_FILE = "replaced.parquet"
PRUNE_FILE = "prune.parquet"


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
    A rewritten file is written under a NEW name (`<old-stem>-r<run_id>.parquet`) and the old file is
    deleted after it: a published object is never overwritten while readers may be scanning it.
    Between the two steps (one DELETE) a reader may see both files, i.e. the kept rows twice; a
    crash there leaves both until the next run's recovery republishes this run, which rewrites the
    old file again to the same new name (same content) and deletes it. The whole step is
    idempotent. Returns the number of rows removed.
    """
    stats = stats if stats is not None else SupersedeStats()
    staged_images = out.staged_table(run_id, "images")
    replaced = _read_ids(out, out.staging(run_id, REPLACED_FILE), ["image_id", "pipeline_version"])
    if replaced is None:
        replaced = _read_ids(out, staged_images, ["image_id", "pipeline_version"])
        if replaced is None:
            return 0  # already published: its supersede step ran before
    elif out.num_rows(staged_images) is None:
        return 0  # already published
    pruned_table = _read_ids(out, out.staging(run_id, PRUNE_FILE), ["image_id"])
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
        new_base = rewritten_name(base, run_id)
        if out.is_s3:
            # An S3 object (multipart upload) appears whole on completion, so the new key is written directly.
            target = f"{folder}/{new_base}"
        else:
            target = out.staging(run_id, f"rewrite-{name}-{new_base}").fs_path()
            out.ensure_parent_dir(target)
        row_group_rows = meta.row_group(0).num_rows
        with pq.ParquetWriter(target, parquet.schema_arrow, filesystem=out.fs, compression="zstd",
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
    if not out.is_s3:
        os.replace(target, f"{folder}/{new_base}")  # atomic rename within one filesystem
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


def recover_staging(out: Out) -> list[dict[str, str]]:
    """Finish or discard what crashed runs left in OUT/_staging. Idempotent; returns what it did.

    A run whose staged files were complete (READY marker present) is published with the record
    it staged; anything else is partial and deleted.
    """
    actions: list[dict[str, str]] = []
    staging = out.staging_root()
    try:
        entries = out.fs.get_file_info(pafs.FileSelector(staging.fs_path(), allow_not_found=True))
    except FileNotFoundError:
        return actions
    except OSError as exc:
        raise storage.storage_error("LIST", staging.uri(), exc) from exc
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        run_id = entry.base_name
        try:
            check_run_id(run_id)
        except ConfigError:
            # Not made by facebatch (or a hostile name): never turned into paths to publish or delete.
            actions.append({"run_id": run_id, "action": "left alone: not a run id"})
            continue
        if is_live(out, run_id):
            actions.append({"run_id": run_id, "action": "left alone: another run is writing it"})
            continue
        if run_id.startswith("people-"):
            from .people import finish_people_swap

            finished = finish_people_swap(out, run_id)
            if not finished:
                out.delete_tree(out.staging(run_id))
            actions.append({"run_id": run_id, "action": "finished people run" if finished else "discarded people run"})
            continue
        if run_id.startswith("compact-"):
            from .compact import finish_compaction

            finished = finish_compaction(out, run_id)
            if not finished:
                out.delete_tree(out.staging(run_id))
            actions.append({"run_id": run_id, "action": "finished compaction" if finished else "discarded compaction"})
            continue
        ready = out.read_json(out.ready_marker(run_id))
        staged_record = out.read_json(out.staged_record(run_id))
        if ready is not None and staged_record is not None:
            staged_record["recovered"] = True
            publish_run(out, run_id, staged_record)
            actions.append({"run_id": run_id, "action": "published"})
        else:
            out.delete_tree(out.staging(run_id))
            actions.append({"run_id": run_id, "action": "discarded"})
    return actions


def read_existing_images(out: Out, columns: list[str]) -> pa.Table:
    """The published images rows (selected columns) across all runs; empty when OUT is new."""
    files = out.list_table_files("images")
    if not files:
        return IMAGES_SCHEMA.empty_table().select(columns)
    import pyarrow.dataset as ds

    dataset = ds.dataset(files, schema=IMAGES_SCHEMA, filesystem=out.fs, format="parquet")
    return dataset.to_table(columns=columns)
