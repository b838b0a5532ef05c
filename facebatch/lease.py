"""One writer per OUT: a lease object, OUT/_lease.json, held by `index`, `compact` and `people`.

    with Lease(out, holder="index run 2026...") as lease:    # out: facebatch.out.Out
        ...                     # write, publish; lease.check() before an irreversible step

The lease names its holder (host, pid, what, since) and an expiry that a background thread
renews every RENEW_SECONDS. A second writer finds it and stops with LeaseHeld (exit code 2),
saying who holds OUT and since when. A lease whose expiry has passed (its holder crashed or was
cut off) is taken over.

Taking it is atomic:
- on S3 a conditional PUT: `If-None-Match: *` creates it only when no lease exists; a stale one is
  replaced with `If-Match: <its ETag>`, so of two writers taking over the same stale lease one
  wins and the other gets 412 PreconditionFailed (and reports the winner). Renewals are also
  `If-Match` on the lease's last ETag, so a holder that was taken over learns it (LeaseLost)
  instead of silently sharing OUT.
- on local disk O_EXCL creates it; reading, taking over, renewing and releasing happen under an
  exclusive flock of OUT/_lease.lock (one host: local OUT is one machine's disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from . import storage
from .config import ConfigError
from .out import Out
# The lease lives this long after its last renewal; renewed every RENEW_SECONDS.
TTL_SECONDS = float(os.environ.get("FACEBATCH_LEASE_TTL_SECONDS", "300"))
RENEW_SECONDS = float(os.environ.get("FACEBATCH_LEASE_RENEW_SECONDS", "30"))


# Tokens of the leases this process holds now (a same-process lease not in here is a leftover).
_ACTIVE_TOKENS: set[str] = set()


def is_stale(lease: dict[str, Any], now: float | None = None) -> bool:
    """May this lease be taken over? When it has expired, or when its holder ran on this machine
    and its process is gone (a SIGKILLed driver: no need to wait for the expiry)."""
    if float(lease.get("expires", 0)) <= (time.time() if now is None else now):
        return True
    if lease.get("host") != socket.gethostname():
        return False
    pid = int(lease.get("pid", 0) or 0)
    if pid == os.getpid():
        return lease.get("token") not in _ACTIVE_TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LeaseHeld(ConfigError):
    """Another writer holds OUT (exit code 2: nothing was done)."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over (it was not renewed in time): it must not publish."""


class UnreadableLease(ValueError):
    """The lease object holds something that is not a facebatch lease record (not JSON, or not an
    object). facebatch always writes whole records (os.replace on disk, one PUT on S3), so this was
    written by something else: it is nobody's lease that this process may renew or delete."""


def _parse(body: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(body)
    except ValueError as exc:
        raise UnreadableLease(f"{where} is not a facebatch lease record ({exc}; {len(body)} bytes)") from exc
    if not isinstance(record, dict):
        raise UnreadableLease(f"{where} is not a facebatch lease record (a JSON {type(record).__name__}, not an object)")
    for key, kinds in _RECORD_FIELDS.items():
        if key in record and (not isinstance(record[key], kinds) or isinstance(record[key], bool)):
            raise UnreadableLease(f"{where} is not a facebatch lease record (its {key!r} is {record[key]!r})")
    if not isinstance(record.get("token"), str) or "expires" not in record:
        raise UnreadableLease(f"{where} is not a facebatch lease record (it has no token or no expiry)")
    return record


# What a lease record's fields must be, where present (token and expires must be).
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "token": (str,), "holder": (str,), "host": (str,), "pid": (int,),
    "since": (int, float), "renewed": (int, float), "expires": (int, float),
}


def _describe(lease: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lease.get("since", 0)))
    expires = time.strftime("%H:%M:%S UTC", time.gmtime(lease.get("expires", 0)))
    return (f"{lease.get('holder', '?')} on host {lease.get('host', '?')} (pid {lease.get('pid', '?')}) "
            f"since {since}, lease valid until {expires}")


class Lease:
    def __init__(self, out: Out | str, holder: str = "facebatch", ttl: float | None = None,
                 renew_every: float | None = None):
        # A plain URI is accepted for callers outside a run (tests, tools); runs pass their Out.
        self.out = Out.from_uri(out) if isinstance(out, str) else out
        self.endpoint = self.out.endpoint
        self.holder = holder
        self.ttl = TTL_SECONDS if ttl is None else ttl
        self.renew_every = RENEW_SECONDS if renew_every is None else renew_every
        self.location = self.out.lease_file()
        self.token = uuid.uuid4().hex
        self.since = 0.0
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: BaseException | None = None
        self._expires_at = float("inf")
        self.took_over: dict[str, Any] | None = None  # the stale lease this one replaced, if any

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "Lease":
        self.since = time.time()
        if self.out.is_s3:
            self._acquire_s3()
        else:
            self._acquire_local()
        _ACTIVE_TOKENS.add(self.token)
        self._thread = threading.Thread(target=self._loop, name="facebatch-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise LeaseLost when the lease was taken over; call before irreversible steps (publish)."""
        if self.lost is not None:
            raise LeaseLost(f"the lease on {self.out.uri()} was lost ({self.lost}); another writer may be using OUT, "
                            "so this one stops without publishing") from self.lost

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. A failed DELETE is logged, not
        raised: the lease then expires by itself and the next writer takes it over."""
        try:
            self._release()
        except storage.StorageError as exc:
            import logging

            logging.getLogger("facebatch").warning("could not delete the lease (it expires in %.0f s): %s", self.ttl, exc)

    def _release(self) -> None:
        self._stop.set()
        _ACTIVE_TOKENS.discard(self.token)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost is not None:
            return  # not ours any more: never delete another writer's lease
        if self.out.is_s3:
            current = self._read_mine_or_none(lambda: self._read_s3()[0])
            if current is not None and current.get("token") == self.token:
                client = storage.s3_client(self.endpoint)
                from botocore.exceptions import BotoCoreError, ClientError

                try:
                    client.delete_object(Bucket=self.location.bucket, Key=self.location.path)
                except (ClientError, BotoCoreError) as exc:
                    raise storage.storage_error("DELETE", self.location.uri(), exc) from exc
            return
        with self._local_lock():
            current = self._read_mine_or_none(self._read_local)
            if current is not None and current.get("token") == self.token:
                os.unlink(self.location.path)

    def _read_mine_or_none(self, read):
        """For release: an unreadable lease object is not this writer's, so it is left alone."""
        try:
            return read()
        except UnreadableLease as exc:
            import logging

            logging.getLogger("facebatch").warning("not deleting the lease: %s", exc)
            return None

    def _held_by_unreadable(self, exc: UnreadableLease) -> LeaseHeld:
        return LeaseHeld(f"{exc}. It may belong to another tool; if no facebatch job is writing "
                         f"{self.out.uri()}, delete {self.location.uri()} and run again")

    # ------------------------------------------------------------------ the record

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "since": self.since, "renewed": now, "expires": now + self.ttl,
        }, indent=2).encode()

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._renew()
            except LeaseLost as exc:
                self.lost = exc
                return
            except (storage.StorageError, OSError) as exc:
                # A failed renewal is retried at the next beat (the TTL leaves several); once the
                # lease has expired unrenewed, another writer may take it: this one has lost it.
                if time.time() > self._expires_at:
                    self.lost = exc
                    return
            except Exception as exc:  # noqa: BLE001 - recorded, and check() raises it
                # Anything else would end this thread silently: the lease would stop being renewed
                # while check() kept passing, and the run would publish after another writer had
                # taken OUT over. Record it as the lease's loss so the run stops before publishing.
                self.lost = exc
                return

    # ------------------------------------------------------------------ S3

    def _read_s3(self) -> tuple[dict[str, Any] | None, str | None]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = storage.s3_client(self.endpoint)
        try:
            response = client.get_object(Bucket=self.location.bucket, Key=self.location.path)
            body = response["Body"].read()
        except ClientError as exc:
            if storage.is_not_found(exc):
                return None, None
            raise storage.storage_error("GET", self.location.uri(), exc) from exc
        except BotoCoreError as exc:
            raise storage.storage_error("GET", self.location.uri(), exc) from exc
        return _parse(body, self.location.uri()), response["ETag"]

    def _put_s3(self, **condition: str) -> bool:
        """PUT the lease under a condition; False when the condition failed (412)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = storage.s3_client(self.endpoint)
        body = self._record()
        try:
            response = client.put_object(Bucket=self.location.bucket, Key=self.location.path, Body=body,
                                         ContentType="application/json", **condition)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise storage.storage_error("PUT", self.location.uri(), exc) from exc
        except BotoCoreError as exc:
            raise storage.storage_error("PUT", self.location.uri(), exc) from exc
        self._etag = response["ETag"]
        self._expires_at = json.loads(body)["expires"]
        return True

    def _acquire_s3(self) -> None:
        for _ in range(3):
            if self._put_s3(IfNoneMatch="*"):
                return
            try:
                current, etag = self._read_s3()
            except UnreadableLease as exc:
                raise self._held_by_unreadable(exc) from exc
            if current is None:
                continue  # released meanwhile: try to create it again
            if not is_stale(current):
                raise LeaseHeld(f"{self.out.uri()} is being written by another facebatch job: {_describe(current)}. "
                                "One writer per OUT: wait for it to finish (or, if it died, for its lease to expire)")
            if self._put_s3(IfMatch=etag):
                self.took_over = current
                return
        raise LeaseHeld(f"{self.out.uri()}: could not take the lease ({self.location.uri()} keeps changing); "
                        "another writer is starting")

    def _renew(self) -> None:
        if self.out.is_s3:
            if not self._put_s3(IfMatch=self._etag):
                try:
                    current, _ = self._read_s3()
                except UnreadableLease as exc:
                    raise LeaseLost(f"replaced by something else: {exc}") from exc
                raise LeaseLost(f"taken over by {_describe(current)}" if current else "the lease object was deleted")
            return
        with self._local_lock():
            try:
                current = self._read_local()
            except UnreadableLease as exc:
                raise LeaseLost(f"replaced by something else: {exc}") from exc
            if current is None or current.get("token") != self.token:
                raise LeaseLost(f"taken over by {_describe(current)}" if current else "the lease file was deleted")
            self._write_local(replace=True)

    # ------------------------------------------------------------------ local disk

    @contextlib.contextmanager
    def _local_lock(self):
        import fcntl

        os.makedirs(self.out.location.path, exist_ok=True)
        fd = os.open(self.out.lease_lock().path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read_local(self) -> dict[str, Any] | None:
        try:
            with open(self.location.path, "rb") as fh:
                body = fh.read()
        except FileNotFoundError:
            return None
        return _parse(body, self.location.uri())

    def _write_local(self, replace: bool) -> None:
        body = self._record()
        if replace:
            tmp = f"{self.location.path}.{self.token}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, self.location.path)
        else:
            fd = os.open(self.location.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
        self._expires_at = json.loads(body)["expires"]

    def _acquire_local(self) -> None:
        with self._local_lock():
            try:
                self._write_local(replace=False)
                return
            except FileExistsError:
                pass
            try:
                current = self._read_local() or {}
            except UnreadableLease as exc:
                raise self._held_by_unreadable(exc) from exc
            if not is_stale(current):
                raise LeaseHeld(f"{self.out.uri()} is being written by another facebatch job: {_describe(current)}. "
                                "One writer per OUT: wait for it to finish (or, if it died, for its lease to expire)")
            self.took_over = current
            self._write_local(replace=True)
