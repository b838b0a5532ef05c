"""Object storage: local directories and S3 (or any S3-compatible store) behind one small API.

boto3 does listing, fetching and server-side copies: it honours the standard credential chain,
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, and retries throttling and 5xx with backoff (we also
retry at our level, see `fetch_bytes`). pyarrow's filesystem writes Parquet (multipart uploads)
and retries with the AWS SDK's standard strategy.

Only "not found" means absent: every other storage failure (5xx, 403, timeouts) raises, with the
object's name, so that no caller mistakes a failed request for a missing object.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

# Current AWS SDKs (boto3 >= 1.36, the C++ SDK in pyarrow) send aws-chunked bodies with trailing
# checksums by default, which S3-compatible stores (MinIO-likes, Ceph, rclone's S3 server) reject,
# e.g. with HTTP 411 MissingContentLength on multipart uploads. Both SDKs read these variables when
# their first client is made, so they are set here, at import, before any client exists; a value
# the user set wins.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")

import pyarrow.fs as pafs  # noqa: E402  (after the environment above)

from .errors import ConfigError  # noqa: E402

log = logging.getLogger(__name__)

# pyarrow's S3 requests (Parquet writes and reads, listings, deletes) retry throttling and 5xx
# like boto3 does; the SDK's default of 3 attempts gives up too soon under S3 SlowDown. Ten
# attempts back off for up to about 90 s in all before a request fails for good.
DEFAULT_S3_MAX_ATTEMPTS = 10


# boto3 (listings, fetches, HEAD/COPY/DELETE of a publish) makes 4 attempts per request with
# adaptive backoff; fetches retry on top of that (`fetch_bytes`), so a photo that keeps failing
# does not hold a fetch thread for minutes.
DEFAULT_BOTO_MAX_ATTEMPTS = 4


def s3_max_attempts() -> int:
    """FACEBATCH_S3_MAX_ATTEMPTS overrides the default (tests of lasting failures use fewer)."""
    return int(os.environ.get("FACEBATCH_S3_MAX_ATTEMPTS") or DEFAULT_S3_MAX_ATTEMPTS)


def boto_max_attempts() -> int:
    """FACEBATCH_S3_MAX_ATTEMPTS, when set, applies to boto3's clients too."""
    return int(os.environ.get("FACEBATCH_S3_MAX_ATTEMPTS") or DEFAULT_BOTO_MAX_ATTEMPTS)


class StorageError(Exception):
    """A storage request failed for a reason other than "not found"; the message names the object.

    Deliberately not an OSError: code that treats OSError as "absent" must never swallow it.
    """


def storage_error(op: str, uri: str, exc: BaseException) -> StorageError:
    return StorageError(f"{op} {uri}: {exc}")


@dataclass(frozen=True)
class Location:
    """A parsed URI: scheme is 's3' or 'file'; for s3, bucket + key prefix; for file, an absolute path."""

    scheme: str
    bucket: str
    path: str  # S3 key (no leading slash) or absolute local path

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def join(self, *parts: str) -> "Location":
        if self.is_s3:
            key = "/".join(p.strip("/") for p in (self.path, *parts) if p.strip("/"))
            return Location("s3", self.bucket, key)
        return Location("file", "", str(Path(self.path, *parts)))

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.is_s3 else self.path

    def fs_path(self) -> str:
        """The path as pyarrow.fs wants it (bucket/key for S3)."""
        return f"{self.bucket}/{self.path}".rstrip("/") if self.is_s3 else self.path

    def at_fs_path(self, fs_path: str) -> "Location":
        """The location of another pyarrow.fs path on this location's store (the inverse of fs_path)."""
        if self.is_s3:
            bucket, key = fs_path.split("/", 1)
            return Location("s3", bucket, key)
        return Location("file", "", fs_path)


def parse_location(uri: str) -> Location:
    if uri.startswith(("s3://", "s3a://")):
        # Not urlparse: S3 keys may contain '#', '?' and ';', which are not URL syntax here.
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        if not bucket:
            raise ConfigError(f"{uri!r} has no bucket: write s3://bucket/prefix")
        return Location("s3", bucket, key.lstrip("/"))
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Location("file", "", os.path.abspath(parsed.path if parsed.scheme else uri))
    raise ConfigError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}: use a local path or s3://")


def endpoint_url(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


_clients: dict[tuple, object] = {}
# Creating boto3 clients from several threads at once is a known boto3 race (its session's
# loaders are not thread-safe), and the fetch threads all ask for a client at start-up.
_clients_lock = threading.Lock()


def s3_client(endpoint: str | None = None):
    """A cached boto3 S3 client per (process, endpoint), with adaptive retries for throttling."""
    endpoint = endpoint_url(endpoint)
    attempts = boto_max_attempts()
    key = (os.getpid(), endpoint, attempts)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": attempts, "mode": "adaptive"},
                max_pool_connections=32,
                connect_timeout=10,
                read_timeout=60,
                # Plain bodies with Content-Length, which every S3-compatible store accepts.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


def is_not_found(exc: BaseException) -> bool:
    """True when a boto3 error says the object (or bucket) does not exist."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error.get("Code") in ("404", "NoSuchKey", "NotFound") or status == 404


def abort_open_uploads(location: Location, endpoint: str | None = None) -> int:
    """Abort the multipart uploads still open under an S3 prefix; returns how many.

    A run that fails or is killed while pyarrow streams its staged Parquet files leaves their
    multipart uploads open. S3 keeps (and bills) the uploaded parts of an open upload until it is
    aborted, and they show in no listing of objects, so deleting the staged folder alone would
    leak them. Stores that do not implement ListMultipartUploads (some S3-compatible servers
    answer 501 NotImplemented) have nothing we could abort: that is logged, not raised.
    """
    if not location.is_s3:
        return 0
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint)
    prefix = location.path.rstrip("/") + "/"
    aborted = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=location.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                try:
                    client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "NoSuchUpload" or is_not_found(exc):
                        continue  # completed or aborted meanwhile: nothing left open
                    raise storage_error("ABORT upload of", f"s3://{location.bucket}/{upload['Key']}", exc) from exc
                aborted += 1
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("NotImplemented", "501") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
            log.info("%s does not list multipart uploads (%s): none to abort under %s", endpoint_url(endpoint) or "S3",
                     code, location.uri())
            return 0
        raise storage_error("LIST uploads under", location.uri(), exc) from exc
    except BotoCoreError as exc:
        raise storage_error("LIST uploads under", location.uri(), exc) from exc
    return aborted


def read_small_file(location: Location, fs: pafs.FileSystem, what: str, shown: str | None = None) -> bytes:
    """The whole of one small file the user pointed at (a manifest, a labels file) or a run wrote
    (a search index). "Not found" is for the user to fix (ConfigError naming it); any other
    failure is a StorageError naming it."""
    shown = shown or location.uri()
    try:
        with fs.open_input_stream(location.fs_path()) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {shown} does not exist") from exc
    except OSError as exc:
        raise storage_error("GET", shown, exc) from exc


def arrow_filesystem(location: Location, endpoint: str | None = None) -> pafs.FileSystem:
    if not location.is_s3:
        return pafs.LocalFileSystem()
    endpoint = endpoint_url(endpoint)
    kwargs: dict = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts()), **kwargs)


@dataclass
class ListedObject:
    uri: str
    size: int
    etag: str
    mtime: float


def list_objects(location: Location, endpoint: str | None = None) -> Iterator[ListedObject]:
    """Yield every object under the location, in lexicographic URI order, streaming.

    S3 listing is paginated (1,000 keys a page) and never held in memory as a whole.
    """
    if location.is_s3:
        client = s3_client(endpoint)
        paginator = client.get_paginator("list_objects_v2")
        prefix = location.path
        if prefix and not prefix.endswith("/"):
            # s3://bucket/photos means the folder photos/, not photos-old/.
            prefix += "/"
        for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                key = item["Key"]
                if key.endswith("/"):
                    continue  # folder placeholder objects
                yield ListedObject(
                    uri=f"s3://{location.bucket}/{key}",
                    size=int(item["Size"]),
                    etag=item["ETag"].strip('"'),
                    mtime=item["LastModified"].timestamp(),
                )
        return
    root = Path(location.path)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {root} does not exist")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # Hidden folders (.git, .thumbnails) are not part of an archive.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished between walk and stat
            yield ListedObject(uri=path, size=st.st_size, etag=local_etag(st), mtime=st.st_mtime)


def local_etag(st: os.stat_result) -> str:
    """A cheap change detector for local files: size and nanosecond mtime (like rsync's quick check)."""
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


class FetchError(Exception):
    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def _fetch_once(uri: str, endpoint: str | None) -> bytes:
    if uri.startswith(("s3://", "s3a://")):
        from botocore.exceptions import BotoCoreError, ClientError

        loc = parse_location(uri)
        try:
            response = s3_client(endpoint).get_object(Bucket=loc.bucket, Key=loc.path)
            return response["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
            raise FetchError(f"S3 {code or status}: {exc}", transient) from exc
        except BotoCoreError as exc:  # connection resets, read timeouts, incomplete reads
            raise FetchError(f"S3 transport error: {exc}", True) from exc
    try:
        with open(uri, "rb") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise FetchError(f"file not found: {uri}", False) from exc
    except IsADirectoryError as exc:
        raise FetchError(f"is a directory: {uri}", False) from exc
    except PermissionError as exc:
        raise FetchError(f"permission denied: {uri}", False) from exc
    except OSError as exc:
        raise FetchError(f"read failed: {exc}", True) from exc


def fetch_bytes(uri: str, *, retries: int = 5, endpoint: str | None = None, base_delay: float = 0.2) -> bytes:
    """Read one object, retrying transient failures with jittered exponential backoff."""
    attempt = 0
    while True:
        try:
            return _fetch_once(uri, endpoint)
        except FetchError as exc:
            if not exc.transient or attempt >= retries:
                if exc.transient:
                    raise FetchError(f"{exc} (gave up after {attempt + 1} attempts)", True) from exc
                raise
            delay = min(10.0, base_delay * (2**attempt)) * (0.5 + random.random())
            time.sleep(delay)
            attempt += 1
