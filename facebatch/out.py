"""OUT, the index's output location, as one object: its filesystem, its layout, and the few storage
steps every stage uses on it (read/write a small JSON object, move, delete, HEAD), each failing
with a StorageError that names the object.

An `Out` is made once, where the command starts (`Out.from_uri(args.out, endpoint)`), and passed
down through recovery, planning, writing, publishing, compaction, people and the lease, so that
no stage parses the URI or builds a filesystem again.

Layout (see ARCHITECTURE.md for the states and what a crash in each leaves):

    OUT/images/<run_id>.parquet         published tables: one file per table per run,
    OUT/faces/<run_id>.parquet          or merged files <compaction_id>-<part>.parquet
    OUT/_runs/<run_id>.json             run records (index and people runs)
    OUT/_staging/<run_id>/              a run, compaction or people run in progress:
        HEARTBEAT                         touched every 30 s while its writer lives
        images.parquet, faces.parquet     staged rows (index run)
        READY, record.json                staged files complete / the record to publish with
        replaced.parquet, prune.parquet   ids whose older rows the publish removes
        compact.json, people.json         the journal of a compaction / people swap
    OUT/people/, face_people/, _search/ a people generation's files
    OUT/_people/<version>.json          the people pointer: which generation is current
    OUT/_lease.json (+ _lease.lock)     one writer per OUT

Only "not found" means absent: every other failure raises storage.StorageError.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage

log = logging.getLogger("facebatch")

STAGING = "_staging"
RUNS = "_runs"
PEOPLE_POINTERS = "_people"
LEASE_FILE = "_lease.json"
LEASE_LOCK = "_lease.lock"

# What a run replaces, staged beside its files by the driver (image_id + pipeline_version of every
# row it wrote for an object that already had one: changed, retried or --full; never new objects,
# which no older file can hold). Without it (a run staged by an older facebatch), every staged
# image id is looked for. With --prune, the ids of objects gone from SOURCE.
REPLACED_FILE = "replaced.parquet"
PRUNE_FILE = "prune.parquet"

# pyarrow reads a small object into a buffer the size of the object; when S3 answers the GET with
# an error whose XML body is larger (a 503 SlowDown for a 25-byte READY marker), the SDK reports
# "Failed to flush response stream", which it does not retry. So small JSON reads retry here.
READ_JSON_ATTEMPTS = 4


class Out:
    """OUT (a local directory or s3://bucket/prefix) with its filesystem, made once."""

    def __init__(self, location: storage.Location, endpoint: str | None = None, given: str | None = None):
        self.location = location
        # OUT as the user wrote it (a relative path stays relative), for messages that quote it.
        self.given = given if given is not None else location.uri()
        # Kept as given (None: the environment's endpoint, resolved by storage when a client is made).
        self.endpoint = endpoint
        self.fs: pafs.FileSystem = storage.arrow_filesystem(location, endpoint)

    @classmethod
    def from_uri(cls, uri: str, endpoint: str | None = None) -> "Out":
        """Parse OUT (ConfigError for an unsupported scheme) and make its filesystem."""
        return cls(storage.parse_location(uri), endpoint, given=uri)

    def __repr__(self) -> str:
        return f"Out({self.uri()!r})"

    # ------------------------------------------------------------------ where things are

    def uri(self) -> str:
        return self.location.uri()

    @property
    def is_s3(self) -> bool:
        return self.location.is_s3

    def join(self, *parts: str) -> storage.Location:
        return self.location.join(*parts)

    def at_fs_path(self, fs_path: str) -> storage.Location:
        return self.location.at_fs_path(fs_path)

    def uri_of(self, fs_path: str) -> str:
        """The URI of a pyarrow.fs path on OUT's store (what DuckDB and error messages want)."""
        return f"s3://{fs_path}" if self.is_s3 else fs_path

    def table_dir(self, name: str) -> storage.Location:
        return self.join(name)

    def table_file(self, name: str, run_id: str) -> storage.Location:
        """Where a run's file of table `name` is published."""
        return self.join(name, f"{run_id}.parquet")

    def table_glob(self, name: str) -> str:
        return self.join(name).uri().rstrip("/") + "/*.parquet"

    def staging_root(self) -> storage.Location:
        return self.join(STAGING)

    def staging(self, run_id: str, *parts: str) -> storage.Location:
        """OUT/_staging/<run_id>[/parts...]: what a run, compaction or people run has staged."""
        return self.join(STAGING, run_id, *parts)

    def staged_table(self, run_id: str, name: str) -> storage.Location:
        """A staged table file (images / faces) of an index run."""
        return self.staging(run_id, f"{name}.parquet")

    def heartbeat(self, run_id: str) -> storage.Location:
        return self.staging(run_id, "HEARTBEAT")

    def ready_marker(self, run_id: str) -> storage.Location:
        return self.staging(run_id, "READY")

    def staged_record(self, run_id: str) -> storage.Location:
        return self.staging(run_id, "record.json")

    def replaced_ids(self, run_id: str) -> storage.Location:
        return self.staging(run_id, REPLACED_FILE)

    def pruned_ids(self, run_id: str) -> storage.Location:
        return self.staging(run_id, PRUNE_FILE)

    def run_record(self, run_id: str) -> storage.Location:
        return self.join(RUNS, f"{run_id}.json")

    def people_pointers(self) -> storage.Location:
        return self.join(PEOPLE_POINTERS)

    def people_pointer(self, version: str) -> storage.Location:
        return self.join(PEOPLE_POINTERS, f"{version}.json")

    def people_generations(self) -> dict[str, dict]:
        """version -> the committed pointer of every pipeline version that has people."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.people_pointers().fs_path(), allow_not_found=True))
        result = {}
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(".json"):
                version = info.base_name[: -len(".json")]
                pointer = self.read_json(self.people_pointer(version))
                if pointer is not None:
                    result[version] = pointer
        return result

    def generation_file(self, pointer: dict, name: str) -> storage.Location:
        """Where a people generation's file lives. Pointers hold paths relative to OUT, so an OUT
        that is copied or moved elsewhere (`aws s3 sync`, `cp -r`) stays valid."""
        return self.join(pointer["files"][name])

    def lease_file(self) -> storage.Location:
        return self.join(LEASE_FILE)

    def lease_lock(self) -> storage.Location:
        return self.join(LEASE_LOCK)

    # ------------------------------------------------------------------ storage steps

    def list_table_files(self, name: str) -> list[str]:
        """fs paths of the published Parquet files of one table."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.table_dir(name).fs_path(), allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def ensure_parent_dir(self, fs_path: str) -> None:
        """Local folders must exist before writing; on S3 a "folder" would only add a marker object."""
        if not self.is_s3:
            self.fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)

    def write_json(self, location: storage.Location, payload: dict[str, Any]) -> None:
        """Write a small JSON object whole: one PUT on S3, write + rename locally."""
        path = location.fs_path()
        self.ensure_parent_dir(path)
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        if location.is_s3:
            with self.fs.open_output_stream(path) as fh:
                fh.write(data)
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def read_json(self, location: storage.Location) -> dict[str, Any] | None:
        """The object's JSON, or None when it does not exist. Any other failure raises StorageError:
        a failed GET must never read as "absent" (recovery would delete a finished run)."""
        attempt = 1
        while True:
            try:
                with self.fs.open_input_stream(location.fs_path()) as fh:
                    return json.loads(fh.read())
            except FileNotFoundError:
                return None
            except OSError as exc:
                if attempt == READ_JSON_ATTEMPTS:
                    raise storage.storage_error("GET", location.uri(), exc) from exc
            time.sleep(0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
            attempt += 1

    def file_type(self, fs_path: str) -> pafs.FileType:
        """What is at fs_path (NotFound when nothing); a failed HEAD raises StorageError naming it."""
        try:
            return self.fs.get_file_info(fs_path).type
        except OSError as exc:
            raise storage.storage_error("HEAD", self.at_fs_path(fs_path).uri(), exc) from exc

    def num_rows(self, location: storage.Location) -> int | None:
        """Rows of a Parquet file by its footer; None when it does not exist."""
        try:
            return pq.ParquetFile(location.fs_path(), filesystem=self.fs).metadata.num_rows
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage.storage_error("read footer of", location.uri(), exc) from exc

    def delete_file(self, fs_path: str) -> None:
        """Delete one object; already gone is fine, any other failure raises StorageError."""
        try:
            self.fs.delete_file(fs_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage.storage_error("DELETE", self.uri_of(fs_path), exc) from exc

    def delete_tree(self, location: storage.Location) -> None:
        try:
            self.fs.delete_dir(location.fs_path())
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage.storage_error("DELETE folder", location.uri(), exc) from exc

    def discard_staged(self, run_id: str) -> None:
        """Delete what a failed or crashed run staged, and abort the multipart uploads it left open."""
        location = self.staging(run_id)
        storage.abort_open_uploads(location, self.endpoint)
        self.delete_tree(location)

    def move(self, src: storage.Location, dst: storage.Location) -> None:
        """Move one file so that it appears at dst whole or not at all; a missing src means done already."""
        if self.is_s3:
            from botocore.exceptions import BotoCoreError, ClientError

            client = storage.s3_client(self.endpoint)
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
        if not os.path.exists(src.path):
            return
        os.makedirs(os.path.dirname(dst.path), exist_ok=True)
        os.replace(src.path, dst.path)  # atomic rename within one filesystem


def fault_point(name: str) -> None:
    """Crash-safety tests set FACEBATCH_FAULT_POINT=<name> to SIGKILL the driver exactly here."""
    if os.environ.get("FACEBATCH_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- heartbeat

# A staging folder whose heartbeat is younger than this belongs to a live run: recovery leaves it.
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 300


class Heartbeat:
    """Touches OUT/_staging/<run_id>/HEARTBEAT every 30 s while a run writes, so that a second
    run started on the same OUT does not mistake the live run's staging for a crash's leftovers."""

    def __init__(self, out: Out, location: storage.Location):
        self.out, self.location = out, location
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # stop() is safe even if the first beat fails
        try:
            self._beat()
        except OSError as exc:
            raise storage.storage_error("write heartbeat", location.uri(), exc) from exc
        _ACTIVE_HEARTBEATS.add(self)
        self._thread = threading.Thread(target=self._loop, name="facebatch-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, out: Out, run_id: str) -> "Heartbeat":
        """Start beating in OUT/_staging/<run_id>/ (made first when local)."""
        location = out.heartbeat(run_id)
        out.ensure_parent_dir(location.fs_path())
        return cls(out, location)

    def _beat(self) -> None:
        # write_json replaces the file in one step, so a reader never sees half a heartbeat.
        self.out.write_json(self.location, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except OSError:
                pass  # a missed beat only matters after STALE_AFTER_SECONDS of them
            except Exception as exc:  # noqa: BLE001 - any other failure must not end a live run's beats either
                log.warning("heartbeat %s: a beat failed (%s: %s); beating on", self.location.uri(), type(exc).__name__, exc)

    def stop(self) -> None:
        """Stop beating. Idempotent, and safe whatever state the heartbeat is in."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _ACTIVE_HEARTBEATS.discard(self)


_ACTIVE_HEARTBEATS: set[Heartbeat] = set()


@atexit.register
def _stop_heartbeats_at_exit() -> None:
    # A process that exits is no longer a live run. Registered after pyarrow.fs was imported, so
    # this runs before pyarrow's own exit handler finalizes S3: a beat after that would fail with
    # "S3 subsystem is finalized" (ArrowInvalid, not OSError) and kill its thread noisily.
    beats = list(_ACTIVE_HEARTBEATS)
    for beat in beats:
        beat._stop.set()
    for beat in beats:  # a beat already under way finishes first (bounded: a hung PUT must not block exit)
        if beat._thread is not None:
            beat._thread.join(timeout=5)


def active_heartbeats() -> set[Heartbeat]:
    return set(_ACTIVE_HEARTBEATS)


def is_live(out: Out, run_id: str) -> bool:
    """Is the run that owns this staging folder still running?"""
    beat = out.read_json(out.heartbeat(run_id))
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
