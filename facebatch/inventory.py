"""S3 Inventory reports as SOURCE: `facebatch index s3://inventory-bucket/.../manifest.json --out ...`.

An S3 Inventory delivery is a `manifest.json` in the destination bucket:

    {"sourceBucket": "photos", "destinationBucket": "arn:aws:s3:::inventory",
     "fileFormat": "CSV" | "Parquet" | "ORC",
     "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag",     (CSV; Parquet/ORC give a schema)
     "files": [{"key": "photos/daily/data/<uuid>.csv.gz", "size": 123, "MD5checksum": "..."}, ...]}

The listed files' keys are relative to the destination bucket. CSV files are gzipped and have NO
header (the columns are fileSchema's, in order) and their object keys are URL-encoded (form
encoding: a space is '+', a '+' is %2B). Parquet files have the columns bucket, key, size, e_tag,
... with plain keys. Every listed file is streamed, one block at a time, so an inventory of a
hundred million objects never sits in memory. In a versioned bucket's inventory only the latest
version that is not a delete marker counts. ORC reports are refused (ask for CSV or Parquet).

A local copy of a report works too: the listed keys are looked up under the folders above the
manifest (a `aws s3 sync` of the destination bucket keeps them where they were).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage
from .config import ConfigError

# The names S3 Inventory uses in CSV fileSchema, and the Parquet column names, for what we need.
CSV_FIELDS = {"bucket": "Bucket", "key": "Key", "size": "Size", "etag": "ETag", "latest": "IsLatest",
              "delete_marker": "IsDeleteMarker"}
PARQUET_FIELDS = {"bucket": "bucket", "key": "key", "size": "size", "etag": "e_tag", "latest": "is_latest",
                  "delete_marker": "is_delete_marker"}


def read_manifest(source: str, endpoint: str | None) -> dict[str, Any]:
    location = storage.parse_location(source)
    data = storage.read_small_file(location, storage.arrow_filesystem(location, endpoint), "inventory manifest", source)
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"inventory manifest {source} is not JSON ({exc.__class__.__name__})") from exc
    missing = [k for k in ("sourceBucket", "fileFormat", "files") if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise ConfigError(f"inventory manifest {source} lacks {', '.join(missing) or 'its fields'}: "
                          "is it an S3 Inventory manifest.json?")
    return manifest


def _destination(source: str, manifest: dict[str, Any]) -> storage.Location:
    """Where the listed files live: the destination bucket (from its ARN), or the manifest's own bucket."""
    location = storage.parse_location(source)
    if location.is_s3:
        arn = manifest.get("destinationBucket") or ""
        bucket = arn.rsplit(":", 1)[-1] if arn else location.bucket
        return storage.Location("s3", bucket, "")
    return location


def _local_file(manifest_path: str, key: str) -> str:
    """A listed key in a local copy of the report: under the first folder above the manifest that holds it."""
    folder = os.path.dirname(os.path.abspath(manifest_path))
    while True:
        candidate = os.path.join(folder, key)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            raise ConfigError(f"inventory file {key!r} listed by {manifest_path} was not found under its folders")
        folder = parent


def _csv_batches(fs, path: str, columns: list[str], chunk: int) -> Iterator[pa.RecordBatch]:
    wanted = {CSV_FIELDS[k] for k in ("bucket", "key", "size", "etag", "latest", "delete_marker")}
    types = {"Bucket": pa.string(), "Key": pa.string(), "Size": pa.int64(), "ETag": pa.string(),
             "IsLatest": pa.string(), "IsDeleteMarker": pa.string()}
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=columns, block_size=8 << 20),
            convert_options=pacsv.ConvertOptions(
                column_types={c: types[c] for c in columns if c in types},
                include_columns=[c for c in columns if c in wanted],
                strings_can_be_null=True,
            ),
        )
        yield from reader


def _normalise(batch: pa.RecordBatch, fields: dict[str, str], url_encoded: bool, source_bucket: str) -> pa.RecordBatch:
    from .tables import PLAN_SCHEMA

    names = batch.schema.names
    if fields["key"] not in names:
        raise ConfigError(f"inventory file has no {fields['key']!r} column (columns: {', '.join(names)})")
    table = pa.Table.from_batches([batch])
    keep = None
    if fields["latest"] in names:  # versioned bucket: only the current version of each key
        keep = pc.equal(pc.utf8_lower(table[fields["latest"]].cast(pa.string())), "true")
    if fields["delete_marker"] in names:
        marker = pc.fill_null(pc.equal(pc.utf8_lower(table[fields["delete_marker"]].cast(pa.string())), "true"), False)
        keep = pc.invert(marker) if keep is None else pc.and_(keep, pc.invert(marker))
    if keep is not None:
        table = table.filter(pc.fill_null(keep, False))
    keys = table[fields["key"]].cast(pa.string())
    if url_encoded:
        keys = pa.array([unquote_plus(k) for k in keys.to_pylist()], pa.string())
    else:
        keys = keys.combine_chunks()
    if fields["bucket"] in names:
        buckets = table[fields["bucket"]].cast(pa.string()).combine_chunks()
    else:
        buckets = pa.array([source_bucket] * len(keys), pa.string())
    # Folder placeholder objects ("photos/2019/") are not photos, as in a listing.
    files = pc.invert(pc.ends_with(keys, "/"))
    uri = pc.binary_join_element_wise(pa.array(["s3://"] * len(keys), pa.string()), buckets, pa.array(["/"] * len(keys), pa.string()), keys, "")
    n = len(keys)
    size = table[fields["size"]].cast(pa.int64()).combine_chunks() if fields["size"] in names else pa.nulls(n, pa.int64())
    etag = (pc.utf8_trim(table[fields["etag"]].cast(pa.string()), '"').combine_chunks()
            if fields["etag"] in names else pa.nulls(n, pa.string()))
    out = pa.RecordBatch.from_arrays([uri, uri, size, etag, pa.nulls(n, pa.float64())], schema=PLAN_SCHEMA)
    return out.filter(files)


def inventory_batches(source: str, endpoint: str | None, chunk: int = 100_000) -> Iterator[pa.RecordBatch]:
    """Every object an S3 Inventory report lists, as PLAN_SCHEMA batches (s3:// uris of the source bucket)."""
    manifest = read_manifest(source, endpoint)
    source_bucket = manifest["sourceBucket"]
    fmt = str(manifest["fileFormat"]).lower()
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"inventory {source} is in {manifest['fileFormat']} format; facebatch reads CSV and "
                          "Parquet inventory reports (choose one of them in the inventory configuration)")
    if fmt == "csv":
        columns = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",") if c.strip()]
        if "Key" not in columns:
            raise ConfigError(f"inventory {source}: fileSchema {manifest.get('fileSchema')!r} has no Key field")
    destination = _destination(source, manifest)
    fs = storage.arrow_filesystem(destination, endpoint)
    for item in manifest["files"]:
        key = item["key"]
        if destination.is_s3:
            path, uri = f"{destination.bucket}/{key}", f"s3://{destination.bucket}/{key}"
        else:
            path = uri = _local_file(source, key)
        try:
            if fmt == "csv":
                raw = _csv_batches(fs, path, columns, chunk)
                fields, url_encoded = CSV_FIELDS, True
            else:
                raw = pq.ParquetFile(path, filesystem=fs, pre_buffer=False).iter_batches(batch_size=chunk)
                fields, url_encoded = PARQUET_FIELDS, False
            for batch in raw:
                yield _normalise(batch, fields, url_encoded, source_bucket)
        except FileNotFoundError as exc:
            raise ConfigError(f"inventory file {uri} listed by {source} does not exist") from exc
        except (pa.ArrowInvalid, gzip.BadGzipFile) as exc:
            raise ConfigError(f"inventory file {uri} listed by {source} could not be parsed: {exc}") from exc
        except OSError as exc:
            raise storage.storage_error("read inventory file", uri, exc) from exc
