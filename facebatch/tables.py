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
        return {name: s.rows for name, s in self.staged.items()}

    def abort(self) -> None:
        """Give up this run: stop beating and delete what it staged (nothing of it was visible)."""
        for staged in self.staged.values():
            try:
                staged.writer.close()
            except OSError:
                pass  # the folder is deleted below; recovery discards it should that fail too
        self.heartbeat.stop()
        _delete_tree(self.fs, self.out.join("_staging", self.run_id))


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


def _superseded_mask(table: pa.Table, replaced: pa.Table, pruned: pa.Array | None) -> pa.Array:
    """Rows of an older file that a run replaces (same image_id and pipeline version) or prunes."""
    key = pc.binary_join_element_wise(table["image_id"], table["pipeline_version"], "\x1f")
    replaced_key = pc.binary_join_element_wise(replaced["image_id"], replaced["pipeline_version"], "\x1f")
    mask = pc.is_in(key, value_set=replaced_key)
    if pruned is not None and len(pruned):
        mask = pc.or_(mask, pc.is_in(table["image_id"], value_set=pruned))
    return mask


def remove_superseded(out: storage.Location, run_id: str, endpoint: str | None = None) -> int:
    """Rewrite older published files without the rows this staged run replaces or prunes.

    Runs before the run's own files are published, so a reader never sees two versions of an
    image for one pipeline version (for a moment it may see neither). Each rewrite replaces one
    file in one atomic step, and the whole step is idempotent, so a crash here is finished by
    the next run's recovery. Returns the number of rows removed.
    """
    fs = storage.arrow_filesystem(out, endpoint)
    staged_images = staging_location(out, run_id, "images").fs_path()
    try:
        replaced = pq.read_table(staged_images, columns=["image_id", "pipeline_version", "status"], filesystem=fs)
    except FileNotFoundError:
        return 0  # already published: its supersede step ran before
    except OSError as exc:  # any other failure aborts the publish; the next run finishes it
        raise storage.storage_error("read", staging_location(out, run_id, "images").uri(), exc) from exc
    pruned = None
    try:
        pruned = pq.read_table(out.join("_staging", run_id, "prune.parquet").fs_path(), filesystem=fs)["image_id"].combine_chunks()
    except FileNotFoundError:
        pass
    if replaced.num_rows == 0 and (pruned is None or len(pruned) == 0):
        return 0
    lo = min(x for x in [pc.min(replaced["image_id"]).as_py(), pc.min(pruned).as_py() if pruned is not None and len(pruned) else None] if x is not None)
    hi = max(x for x in [pc.max(replaced["image_id"]).as_py(), pc.max(pruned).as_py() if pruned is not None and len(pruned) else None] if x is not None)
    removed = 0
    for name in ("images", "faces"):
        for path in list_table_files(out, name, endpoint):
            if path.rsplit("/", 1)[1] == f"{run_id}.parquet":
                continue
            meta = pq.ParquetFile(path, filesystem=fs).metadata
            stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
            # Sorted files: skip those whose image_id range misses the run's range entirely.
            if stats and all(st is not None and st.has_min_max and (st.max < lo or st.min > hi) for st in stats):
                continue
            table = pq.read_table(path, filesystem=fs)
            mask = _superseded_mask(table, replaced, pruned)
            n = pc.sum(mask).as_py() or 0
            if not n:
                continue
            kept = table.filter(pc.invert(mask))
            removed += n
            if kept.num_rows == 0:
                delete_file(fs, path, _uri_of(out, path))
                continue
            tmp = out.join("_staging", run_id, f"rewrite-{name}-{path.rsplit('/', 1)[1]}")
            pq.write_table(kept, tmp.fs_path(), filesystem=fs, compression="zstd", row_group_size=meta.row_group(0).num_rows if meta.num_row_groups else None)
            dst = storage.Location(out.scheme, out.bucket, path.split("/", 1)[1] if out.is_s3 else path)
            _move(out, tmp, dst, endpoint)
    return removed


def publish_run(out: storage.Location, run_id: str, record: dict[str, Any], endpoint: str | None = None,
                heartbeat: "Heartbeat | None" = None) -> None:
    """Make a staged run visible (faces, then images), then write its run record. Idempotent.

    The run's heartbeat (when given) keeps beating while it publishes, so that no other run takes
    a slow publish for an abandoned one; it stops just before the staging folder is deleted."""
    fs = storage.arrow_filesystem(out, endpoint)
    record = dict(record, superseded_rows_removed=remove_superseded(out, run_id, endpoint))
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


def delete_file(fs: pafs.FileSystem, fs_path: str, uri: str) -> None:
    """Delete one object; already gone is fine, any other failure raises StorageError."""
    try:
        fs.delete_file(fs_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage.storage_error("DELETE", uri, exc) from exc


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
                _delete_tree(fs, out.join("_staging", run_id))
            actions.append({"run_id": run_id, "action": "finished people run" if finished else "discarded people run"})
            continue
        if run_id.startswith("compact-"):
            from .compact import finish_compaction

            finished = finish_compaction(out, run_id, endpoint)
            if not finished:
                _delete_tree(fs, out.join("_staging", run_id))
            actions.append({"run_id": run_id, "action": "finished compaction" if finished else "discarded compaction"})
            continue
        ready = read_json(fs, staging_location(out, run_id, "READY"))
        staged_record = read_json(fs, out.join("_staging", run_id, "record.json"))
        if ready is not None and staged_record is not None:
            staged_record["recovered"] = True
            publish_run(out, run_id, staged_record, endpoint)
            actions.append({"run_id": run_id, "action": "published"})
        else:
            _delete_tree(fs, out.join("_staging", run_id))
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
