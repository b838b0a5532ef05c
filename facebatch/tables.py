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
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .config import ConfigError, check_run_id

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


# A staging folder whose heartbeat is younger than this belongs to a live run: recovery leaves it.
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 300


class Heartbeat:
    """Touches OUT/_staging/<run_id>/HEARTBEAT every 30 s while a run writes, so that a second
    run started on the same OUT does not mistake the live run's staging for a crash's leftovers."""

    def __init__(self, fs: pafs.FileSystem, location: storage.Location):
        self.fs, self.location = fs, location
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # stop() is safe even if the first beat fails
        try:
            self._beat()
        except OSError as exc:
            raise storage.storage_error("write heartbeat", location.uri(), exc) from exc
        _ACTIVE_HEARTBEATS.add(self)
        self._thread = threading.Thread(target=self._loop, name="facebatch-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        # write_json replaces the file in one step, so a reader never sees half a heartbeat.
        write_json(self.fs, self.location, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except OSError:
                pass  # a missed beat only matters after STALE_AFTER_SECONDS of them

    def stop(self) -> None:
        """Stop beating. Idempotent, and safe whatever state the heartbeat is in."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _ACTIVE_HEARTBEATS.discard(self)


_ACTIVE_HEARTBEATS: set[Heartbeat] = set()


def active_heartbeats() -> set[Heartbeat]:
    return set(_ACTIVE_HEARTBEATS)


def _is_live(fs: pafs.FileSystem, out: storage.Location, run_id: str) -> bool:
    """Is the run that owns this staging folder still running?"""
    beat = read_json(fs, staging_location(out, run_id, "HEARTBEAT"))
    if not beat:
        return False
    if beat.get("host") == socket.gethostname():
        # Same machine: the driver's process answers for itself (a SIGKILLed driver is dead at once).
        try:
            os.kill(int(beat["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return beat["pid"] != os.getpid()
    return time.time() - float(beat.get("time", 0)) < STALE_AFTER_SECONDS


@dataclass
class RunWriter:
    """Streams a run's rows into one staged Parquet file per table, sorted by image_id.

    Rows must arrive in image_id order (the pipeline preserves the plan's order); this is
    checked, because the row-group statistics that make lookups cheap rely on it.
    """

    out: storage.Location
    run_id: str
    endpoint: str | None = None
    row_group_size: int = 50_000
    fs: pafs.FileSystem = field(init=False)
    staged: dict[str, StagedTable] = field(default_factory=dict)
    _buffers: dict[str, list[pa.Table]] = field(default_factory=dict)
    _buffered_rows: dict[str, int] = field(default_factory=dict)
    # "open" while rows stream in; "complete" once READY is written; "aborted" after abort().
    state: str = field(default="open", init=False)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        self.fs = storage.arrow_filesystem(self.out, self.endpoint)
        # The heartbeat comes first: a staging folder without one looks abandoned to other runs.
        heartbeat = staging_location(self.out, self.run_id, "HEARTBEAT")
        ensure_parent_dir(self.fs, self.out, heartbeat.fs_path())
        self.heartbeat = Heartbeat(self.fs, heartbeat)
        try:
            self._open_writers()
        except BaseException:
            self.heartbeat.stop()  # what was staged is left for recovery to discard
            raise

    def _open_writers(self) -> None:
        for name, schema in TABLES.items():
            path = staging_location(self.out, self.run_id, name).fs_path()
            ensure_parent_dir(self.fs, self.out, path)
            writer = pq.ParquetWriter(
                path,
                schema,
                filesystem=self.fs,
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
        ready = staging_location(self.out, self.run_id, "READY").fs_path()
        with self.fs.open_output_stream(ready) as fh:
            fh.write(json.dumps({name: s.rows for name, s in self.staged.items()}).encode())
        self.state = "complete"
        return {name: s.rows for name, s in self.staged.items()}

    def abort(self) -> None:
        """Give up this run: stop beating, delete what it staged (nothing of it was visible) and
        abort the uploads left open."""
        self.state = "aborted"
        for staged in self.staged.values():
            try:
                staged.writer.close()
            except OSError:
                pass  # the folder is deleted below; recovery discards it should that fail too
        self.heartbeat.stop()
        discard_staged(self.fs, self.out, self.run_id, self.endpoint)


def staging_location(out: storage.Location, run_id: str, name: str) -> storage.Location:
    filename = name if name in ("READY", "HEARTBEAT") else f"{name}.parquet"
    return out.join("_staging", run_id, filename)


def table_file(out: storage.Location, name: str, run_id: str) -> storage.Location:
    return out.join(name, f"{run_id}.parquet")


def _move(out: storage.Location, src: storage.Location, dst: storage.Location, endpoint: str | None) -> None:
    """Move one file so that it appears at dst whole or not at all; a missing src means done already."""
    if out.is_s3:
        from botocore.exceptions import BotoCoreError, ClientError

        client = storage.s3_client(endpoint)
        try:
            client.head_object(Bucket=src.bucket, Key=src.path)
        except ClientError as exc:
            if storage.is_not_found(exc):
                return  # moved by an earlier attempt
            # Throttling, 5xx, no access: the publish fails and the next run finishes it.
            raise storage.storage_error("HEAD", src.uri(), exc) from exc
        except BotoCoreError as exc:
            raise storage.storage_error("HEAD", src.uri(), exc) from exc
        try:
            # Managed copy: multipart for objects over 5 GB; the destination appears on completion.
            client.copy({"Bucket": src.bucket, "Key": src.path}, dst.bucket, dst.path)
        except (ClientError, BotoCoreError) as exc:
            raise storage.storage_error(f"COPY {src.uri()} ->", dst.uri(), exc) from exc
        try:
            client.delete_object(Bucket=src.bucket, Key=src.path)
        except (ClientError, BotoCoreError) as exc:
            raise storage.storage_error("DELETE", src.uri(), exc) from exc
        return
    import os

    if not os.path.exists(src.path):
        return
    os.makedirs(os.path.dirname(dst.path), exist_ok=True)
    os.replace(src.path, dst.path)  # atomic rename within one filesystem


def fault_point(name: str) -> None:
    """Crash-safety tests set FACEBATCH_FAULT_POINT=<name> to SIGKILL the driver exactly here."""
    if os.environ.get("FACEBATCH_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# What a run replaces, staged beside its files by the driver (image_id + pipeline_version of every
# row it wrote for an object that already had one: changed, retried or --full; never new objects,
# which no older file can hold). Without it (a run staged by an older facebatch), every staged
# image id is looked for.
REPLACED_FILE = "replaced.parquet"
PRUNE_FILE = "prune.parquet"


def _read_ids(fs: pafs.FileSystem, location: storage.Location, columns: list[str]) -> pa.Table | None:
    try:
        return pq.read_table(location.fs_path(), columns=columns, filesystem=fs)
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


def remove_superseded(out: storage.Location, run_id: str, endpoint: str | None = None,
                      stats: SupersedeStats | None = None) -> int:
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
    fs = storage.arrow_filesystem(out, endpoint)
    stats = stats if stats is not None else SupersedeStats()
    staged_images = staging_location(out, run_id, "images")
    replaced = _read_ids(fs, out.join("_staging", run_id, REPLACED_FILE), ["image_id", "pipeline_version"])
    if replaced is None:
        replaced = _read_ids(fs, staged_images, ["image_id", "pipeline_version"])
        if replaced is None:
            return 0  # already published: its supersede step ran before
    elif _num_rows(fs, staged_images) is None:
        return 0  # already published
    pruned_table = _read_ids(fs, out.join("_staging", run_id, PRUNE_FILE), ["image_id"])
    pruned = _sorted_unique(pruned_table["image_id"]) if pruned_table is not None else []
    replaced_keys = set(zip(replaced["image_id"].to_pylist(), replaced["pipeline_version"].to_pylist()))
    replaced_ids = sorted({i for i, _ in replaced_keys})
    del replaced
    if not replaced_ids and not pruned:
        return 0
    for name in ("images", "faces"):
        for path in list_table_files(out, name, endpoint):
            base = path.rsplit("/", 1)[1]
            if base == f"{run_id}.parquet":
                continue
            stats.rows_removed += _supersede_file(fs, out, run_id, name, path, replaced_ids, replaced_keys, pruned, stats)
    return stats.rows_removed


def _supersede_file(fs: pafs.FileSystem, out: storage.Location, run_id: str, name: str, path: str,
                    replaced_ids: list[str], replaced_keys: set, pruned: list[str], stats: SupersedeStats) -> int:
    uri = _uri_of(out, path)
    try:
        parquet = pq.ParquetFile(path, filesystem=fs)
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
            delete_file(fs, path, uri)
            stats.files_deleted += 1
            return removed
        folder, base = path.rsplit("/", 1)
        new_base = rewritten_name(base, run_id)
        if out.is_s3:
            # An S3 object (multipart upload) appears whole on completion, so the new key is written directly.
            target = f"{folder}/{new_base}"
        else:
            target = out.join("_staging", run_id, f"rewrite-{name}-{new_base}").fs_path()
            ensure_parent_dir(fs, out, target)
        row_group_rows = meta.row_group(0).num_rows
        with pq.ParquetWriter(target, parquet.schema_arrow, filesystem=fs, compression="zstd",
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
    delete_file(fs, path, uri)
    return removed


def publish_run(out: storage.Location, run_id: str, record: dict[str, Any], endpoint: str | None = None,
                heartbeat: "Heartbeat | None" = None) -> None:
    """Make a staged run visible (faces, then images), then write its run record. Idempotent.

    The run's heartbeat (when given) keeps beating while it publishes, so that no other run takes
    a slow publish for an abandoned one; it stops just before the staging folder is deleted."""
    fs = storage.arrow_filesystem(out, endpoint)
    supersede = SupersedeStats()
    if out.is_s3:
        # An earlier attempt of this publish that was killed while rewriting a file left its upload
        # open (S3 keeps the parts, unseen, until aborted); this attempt writes the file again.
        for name in ("images", "faces"):
            storage.abort_open_uploads(out.join(name), endpoint, key_suffix=f"-r{run_id}.parquet")
    remove_superseded(out, run_id, endpoint, supersede)
    record = dict(record, superseded_rows_removed=supersede.rows_removed,
                  superseded_files_rewritten=supersede.files_rewritten,
                  superseded_row_groups_probed=supersede.row_groups_probed)
    fault_point("publish-after-supersede")
    for name in ("faces", "images"):
        staged = staging_location(out, run_id, name)
        if _num_rows(fs, staged) == 0:
            continue  # nothing new (a quiet night): no empty files in the table folders
        _move(out, staged, table_file(out, name, run_id), endpoint)
        fault_point(f"publish-after-{name}")
    record = dict(record, state="published", published_at=time.time())
    write_json(fs, out.join("_runs", f"{run_id}.json"), record)
    if heartbeat is not None:
        heartbeat.stop()
    _delete_tree(fs, out.join("_staging", run_id))


def ensure_parent_dir(fs: pafs.FileSystem, location: storage.Location, fs_path: str) -> None:
    """Local folders must exist before writing; on S3 a "folder" would only add a marker object."""
    if not location.is_s3:
        fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)


def _num_rows(fs: pafs.FileSystem, location: storage.Location) -> int | None:
    try:
        return pq.ParquetFile(location.fs_path(), filesystem=fs).metadata.num_rows
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage.storage_error("read footer of", location.uri(), exc) from exc


def write_json(fs: pafs.FileSystem, location: storage.Location, payload: dict[str, Any]) -> None:
    path = location.fs_path()
    ensure_parent_dir(fs, location, path)
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    if location.is_s3:
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    import os

    os.replace(tmp, path)


# pyarrow reads a small object into a buffer the size of the object; when S3 answers the GET with
# an error whose XML body is larger (a 503 SlowDown for a 25-byte READY marker), the SDK reports
# "Failed to flush response stream", which it does not retry. So small JSON reads retry here.
READ_JSON_ATTEMPTS = 4


def read_json(fs: pafs.FileSystem, location: storage.Location) -> dict[str, Any] | None:
    """The object's JSON, or None when it does not exist. Any other failure raises StorageError:
    a failed GET must never read as "absent" (recovery would delete a finished run)."""
    attempt = 1
    while True:
        try:
            with fs.open_input_stream(location.fs_path()) as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            if attempt == READ_JSON_ATTEMPTS:
                raise storage.storage_error("GET", location.uri(), exc) from exc
        time.sleep(0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
        attempt += 1


def file_type(fs: pafs.FileSystem, out: storage.Location, fs_path: str) -> pafs.FileType:
    """What is at fs_path (NotFound when nothing); a failed HEAD raises StorageError naming it."""
    try:
        return fs.get_file_info(fs_path).type
    except OSError as exc:
        raise storage.storage_error("HEAD", out.at_fs_path(fs_path).uri(), exc) from exc


def delete_file(fs: pafs.FileSystem, fs_path: str, uri: str) -> None:
    """Delete one object; already gone is fine, any other failure raises StorageError."""
    try:
        fs.delete_file(fs_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage.storage_error("DELETE", uri, exc) from exc


def discard_staged(fs: pafs.FileSystem, out: storage.Location, run_id: str, endpoint: str | None) -> None:
    """Delete what a failed or crashed run staged, and abort the multipart uploads it left open."""
    location = out.join("_staging", run_id)
    storage.abort_open_uploads(location, endpoint)
    _delete_tree(fs, location)


def _delete_tree(fs: pafs.FileSystem, location: storage.Location) -> None:
    try:
        fs.delete_dir(location.fs_path())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage.storage_error("DELETE folder", location.uri(), exc) from exc


def recover_staging(out: storage.Location, endpoint: str | None = None) -> list[dict[str, str]]:
    """Finish or discard what crashed runs left in OUT/_staging. Idempotent; returns what it did.

    A run whose staged files were complete (READY marker present) is published with the record
    it staged; anything else is partial and deleted.
    """
    fs = storage.arrow_filesystem(out, endpoint)
    actions: list[dict[str, str]] = []
    staging = out.join("_staging")
    try:
        entries = fs.get_file_info(pafs.FileSelector(staging.fs_path(), allow_not_found=True))
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
        if _is_live(fs, out, run_id):
            actions.append({"run_id": run_id, "action": "left alone: another run is writing it"})
            continue
        if run_id.startswith("people-"):
            from .people import finish_people_swap

            finished = finish_people_swap(out, run_id, endpoint)
            if not finished:
                discard_staged(fs, out, run_id, endpoint)
            actions.append({"run_id": run_id, "action": "finished people run" if finished else "discarded people run"})
            continue
        if run_id.startswith("compact-"):
            from .compact import finish_compaction

            finished = finish_compaction(out, run_id, endpoint)
            if not finished:
                discard_staged(fs, out, run_id, endpoint)
            actions.append({"run_id": run_id, "action": "finished compaction" if finished else "discarded compaction"})
            continue
        ready = read_json(fs, staging_location(out, run_id, "READY"))
        staged_record = read_json(fs, out.join("_staging", run_id, "record.json"))
        if ready is not None and staged_record is not None:
            staged_record["recovered"] = True
            publish_run(out, run_id, staged_record, endpoint)
            actions.append({"run_id": run_id, "action": "published"})
        else:
            discard_staged(fs, out, run_id, endpoint)
            actions.append({"run_id": run_id, "action": "discarded"})
    return actions


def _uri_of(out: storage.Location, fs_path: str) -> str:
    return f"s3://{fs_path}" if out.is_s3 else fs_path


def table_glob(out: storage.Location, name: str) -> str:
    return out.join(name).uri().rstrip("/") + "/*.parquet"


def list_table_files(out: storage.Location, name: str, endpoint: str | None = None) -> list[str]:
    """fs paths of the published Parquet files of one table."""
    fs = storage.arrow_filesystem(out, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(out.join(name).fs_path(), allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def read_existing_images(out: storage.Location, columns: list[str], endpoint: str | None = None) -> pa.Table:
    """The published images rows (selected columns) across all runs; empty when OUT is new."""
    files = list_table_files(out, "images", endpoint)
    if not files:
        return IMAGES_SCHEMA.empty_table().select(columns)
    fs = storage.arrow_filesystem(out, endpoint)
    import pyarrow.dataset as ds

    dataset = ds.dataset(files, schema=IMAGES_SCHEMA, filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns)
