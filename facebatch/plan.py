"""Plan a run: list SOURCE, compare with what OUT already holds, and yield the work in image_id order.

What planning holds in driver memory is bounded, whatever the size of the archive or the index:
- the listing (a directory, an S3 prefix, a manifest or an S3 Inventory report) is streamed in
  blocks of LISTING_CHUNK rows to a local Parquet spill file;
- the published `images` files are read by DuckDB itself (local paths, or s3:// through httpfs),
  never loaded through Python; the comparison (hash aggregation, hash joins, sort) runs under a
  memory limit (FACEBATCH_PLAN_MEMORY, 1GB by default) and spills to the plan's own folder.
The result comes back in Arrow batches, sorted by image_id, which is what keeps every output file
sorted (row-group statistics then make lookups by image_id cheap).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage
from .out import Out
from .config import ConfigError, IndexConfig
from .tables import PLAN_SCHEMA

MANIFEST_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
LISTING_CHUNK = 100_000


@dataclass
class Plan:
    """The work of one run plus the counts the run record reports."""

    spill_dir: str
    todo_path: str
    counts: dict[str, int] = field(default_factory=dict)  # new, changed, retry, unchanged, deleted, listed
    deleted_ids_path: str | None = None

    def batches(self, rows: int = 10_000, first_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """The objects to process in batches of `rows`; with `first_rows`, the first batch is cut
        in two there, so that the first results of a run come after a few images, not a batch."""
        first = True
        for batch in pq.ParquetFile(self.todo_path, pre_buffer=False).iter_batches(batch_size=rows):
            if first and first_rows and batch.num_rows > first_rows:
                yield batch.slice(0, first_rows)
                batch = batch.slice(first_rows)
            first = False
            yield batch

    @property
    def num_todo(self) -> int:
        return pq.ParquetFile(self.todo_path).metadata.num_rows

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.spill_dir, ignore_errors=True)


def is_inventory(source: str) -> bool:
    """An S3 Inventory report: SOURCE names its manifest.json (on S3 or a local copy)."""
    return source.lower().endswith("manifest.json")


def is_manifest(source: str) -> bool:
    return is_inventory(source) or source.lower().endswith(MANIFEST_SUFFIXES)


def _listing_batches(config: IndexConfig) -> Iterator[pa.RecordBatch]:
    """The SOURCE as PLAN_SCHEMA batches (not yet sorted), streamed: never the whole listing at once."""
    if is_inventory(config.source):
        from .inventory import inventory_batches

        yield from inventory_batches(config.source, config.s3_endpoint_url(), LISTING_CHUNK)
        return
    if is_manifest(config.source):
        yield from _manifest_batches(config)
        return
    location = storage.parse_location(config.source)
    buffer: list[storage.ListedObject] = []

    def flush() -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pydict(
            {
                "image_id": [o.uri for o in buffer],
                "uri": [o.uri for o in buffer],
                "size": [o.size for o in buffer],
                "etag": [o.etag for o in buffer],
                "mtime": [o.mtime for o in buffer],
            },
            schema=PLAN_SCHEMA,
        )
        buffer.clear()
        return batch

    try:
        for obj in storage.list_objects(location, config.s3_endpoint_url()):
            buffer.append(obj)
            if len(buffer) >= LISTING_CHUNK:
                yield flush()
    except FileNotFoundError as exc:
        raise ConfigError(f"SOURCE {config.source}: {exc}") from exc
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, (ClientError, BotoCoreError)):
            raise ConfigError(f"cannot list SOURCE {config.source}: {exc}") from exc
        raise
    if buffer:
        yield flush()


# Manifest columns and the types they are read as (CSV type inference per block would otherwise
# guess differently from one block to the next).
MANIFEST_TYPES = {"uri": pa.string(), "image_id": pa.string(), "etag": pa.string(), "size": pa.int64()}


def _manifest_reader(config: IndexConfig) -> Iterator[pa.RecordBatch]:
    """The manifest's raw batches, streamed (CSV blocks or Parquet row-group batches)."""
    location = storage.parse_location(config.source)
    fs = storage.arrow_filesystem(location, config.s3_endpoint_url())
    lower = config.source.lower()
    try:
        if lower.endswith((".csv", ".csv.gz")):
            stream = fs.open_input_stream(location.fs_path(), compression="gzip" if lower.endswith(".gz") else None)
            with stream:
                reader = pacsv.open_csv(
                    stream,
                    read_options=pacsv.ReadOptions(block_size=8 << 20),
                    convert_options=pacsv.ConvertOptions(column_types=MANIFEST_TYPES, strings_can_be_null=True),
                )
                yield from reader
            return
        # pre_buffer=False: with it, iterating a whole file buffers every row group up front.
        parquet = pq.ParquetFile(location.fs_path(), filesystem=fs, pre_buffer=False)
        columns = [c for c in MANIFEST_TYPES if c in parquet.schema_arrow.names] or None
        yield from parquet.iter_batches(batch_size=LISTING_CHUNK, columns=columns)
    except FileNotFoundError as exc:
        raise ConfigError(f"manifest {config.source} does not exist") from exc
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"manifest {config.source} could not be parsed: {exc}") from exc
    except OSError as exc:
        raise storage.storage_error("read manifest", config.source, exc) from exc


def _manifest_batches(config: IndexConfig) -> Iterator[pa.RecordBatch]:
    """A manifest (CSV or Parquet with a 'uri' column; optional image_id, etag, size) as PLAN_SCHEMA
    batches, one block at a time: a manifest of tens of millions of rows never sits in memory."""
    on_s3 = storage.parse_location(config.source).is_s3
    base = os.path.dirname(os.path.abspath(config.source))
    row = 0
    for raw in _manifest_reader(config):
        names = raw.schema.names
        if "uri" not in names:
            raise ConfigError(
                f"manifest {config.source} has no 'uri' column (columns: {', '.join(names)}); "
                "it needs 'uri' and may have 'image_id', 'etag', 'size'"
            )
        n = raw.num_rows
        uri = raw.column("uri").cast(pa.string())
        if uri.null_count:
            raise ConfigError(f"manifest {config.source} has empty uri values (first block with one starts at row {row + 1})")

        def optional(name: str, default):
            return raw.column(name).cast(MANIFEST_TYPES[name]) if name in names else default

        if on_s3:
            # A manifest on S3 names S3 objects only: were it to name local paths, whoever can write
            # to the bucket could make the workers read (and publish the errors of) their own files.
            local = pc.invert(pc.or_(pc.starts_with(uri, "s3://"), pc.starts_with(uri, "s3a://")))
            offenders = pc.filter(uri, local)
            if len(offenders):
                first = ", ".join(repr(u) for u in offenders.slice(0, 3).to_pylist())
                raise ConfigError(
                    f"manifest {config.source} is on S3 but names local or relative path(s) "
                    f"(first: {first}); a manifest on S3 may name only s3:// objects"
                )
        else:
            # Relative local paths in a manifest are relative to the manifest's folder.
            absolute = pc.or_(pc.or_(pc.starts_with(uri, "s3://"), pc.starts_with(uri, "s3a://")), pc.starts_with(uri, "/"))
            if not pc.all(absolute).as_py():
                uri = pa.array([u if a else os.path.join(base, u) for u, a in zip(uri.to_pylist(), absolute.to_pylist())], pa.string())
        image_id = optional("image_id", uri)
        if image_id.null_count:
            raise ConfigError(f"manifest {config.source} has empty image_id values (first block with one starts at row {row + 1})")
        yield pa.RecordBatch.from_arrays(
            [image_id, uri, optional("size", pa.nulls(n, pa.int64())), optional("etag", pa.nulls(n, pa.string())),
             pa.nulls(n, pa.float64())],
            schema=PLAN_SCHEMA,
        )
        row += n


# Planning's DuckDB limits: the joins, the aggregation and the sort spill to the plan's own folder
# beyond this much memory, so the driver stays small whatever the size of the index or listing.
PLAN_MEMORY_LIMIT = os.environ.get("FACEBATCH_PLAN_MEMORY", "512MB")
PLAN_THREADS = int(os.environ.get("FACEBATCH_PLAN_THREADS", "0")) or None


def plan_connection(spill_dir: str, out: Out) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for planning: a database file in the spill folder (tables it makes live
    on disk, not in memory), a memory limit, and S3 access through httpfs when OUT is on S3."""
    con = duckdb.connect(os.path.join(spill_dir, "plan.duckdb"))
    con.execute(f"SET memory_limit='{PLAN_MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory='{spill_dir}'")
    con.execute("SET preserve_insertion_order=false")
    if PLAN_THREADS:
        con.execute(f"SET threads={PLAN_THREADS}")
    if out.is_s3:
        from .query import configure_s3

        configure_s3(con, out.endpoint)
    return con


def _sql_list(uris: list[str]) -> str:
    return "[" + ", ".join("'" + u.replace("'", "''") + "'" for u in uris) + "]"


def build_plan(config: IndexConfig, pipeline_version: str, out: Out | None = None) -> Plan:
    """Plan a run; its spill folder is the caller's to remove (Plan.cleanup), unless planning fails.

    `out` is the run's Out (made from config.out when not given)."""
    out = out if out is not None else Out.from_uri(config.out, config.s3_endpoint_url())
    spill_dir = tempfile.mkdtemp(prefix="facebatch-plan-")
    try:
        return _build_plan(config, pipeline_version, spill_dir, out)
    except BaseException:
        Plan(spill_dir=spill_dir, todo_path="").cleanup()
        raise


def _build_plan(config: IndexConfig, pipeline_version: str, spill_dir: str, out: Out) -> Plan:
    listing_path = os.path.join(spill_dir, "listing.parquet")
    with pq.ParquetWriter(listing_path, PLAN_SCHEMA) as writer:
        for batch in _listing_batches(config):
            writer.write_batch(batch)

    con = plan_connection(spill_dir, out)
    try:
        return _classify(con, config, pipeline_version, spill_dir, listing_path, out)
    except duckdb.IOException as exc:
        # httpfs could not read a published file (S3 error after its retries): nothing is planned.
        raise storage.StorageError(f"planning could not read the published images of {out.uri()}: {exc}") from exc
    finally:
        con.close()


def _classify(con: duckdb.DuckDBPyConnection, config: IndexConfig, pipeline_version: str, spill_dir: str,
              listing_path: str, out: Out) -> Plan:
    # DuckDB reads the published files itself (local paths, or s3:// through httpfs), only the
    # columns it needs, skipping row groups of other pipeline versions by their statistics: the
    # index never passes through Python.
    files = [out.uri_of(p) for p in out.list_table_files("images")]
    version = "'" + pipeline_version.replace("'", "''") + "'"
    if files:
        existing = f"read_parquet({_sql_list(files)})"
    else:
        existing = "(SELECT NULL::VARCHAR image_id, NULL::VARCHAR etag, NULL::VARCHAR status, " \
                   "NULL::VARCHAR pipeline_version, NULL::TIMESTAMPTZ indexed_at WHERE FALSE)"
    listing = "read_parquet('" + listing_path.replace("'", "''") + "')"
    duplicate = con.execute(
        f"SELECT image_id, count(*) FROM {listing} GROUP BY image_id HAVING count(*) > 1 LIMIT 1"
    ).fetchone()
    if duplicate:
        raise ConfigError(f"SOURCE lists image_id {duplicate[0]!r} {duplicate[1]} times; image ids must be unique")

    # The latest row per image_id for this pipeline version decides what happens to an object.
    # A version has one row per image (publishing supersedes older rows), so the "latest" window
    # runs only over the rare ids with several rows; everything here is a hash join or an
    # aggregation with fixed-size states, which DuckDB spills to disk under its memory limit.
    published = f"(SELECT image_id, etag, status, indexed_at FROM {existing} WHERE pipeline_version = {version})"
    con.execute(f"CREATE TABLE repeated_ids AS SELECT image_id FROM {published} GROUP BY image_id HAVING count(*) > 1")
    con.execute(
        f"""
        CREATE VIEW current_rows AS
        SELECT image_id, etag, status FROM {published} WHERE image_id NOT IN (SELECT image_id FROM repeated_ids)
        UNION ALL
        SELECT image_id, etag, status FROM {published} WHERE image_id IN (SELECT image_id FROM repeated_ids)
        QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY indexed_at DESC) = 1
        """
    )
    # One full outer join classifies listed objects and finds deleted ones; only the rows that
    # matter later (not 'unchanged', unless --full) keep their columns, so the table stays small.
    con.execute(
        f"""
        CREATE TABLE classified AS
        SELECT change,
          CASE WHEN change <> 'unchanged' OR $full THEN image_id END AS image_id,
          CASE WHEN change <> 'unchanged' OR $full THEN uri END AS uri,
          CASE WHEN change <> 'unchanged' OR $full THEN size END AS size,
          CASE WHEN change <> 'unchanged' OR $full THEN etag END AS etag
        FROM (
          SELECT coalesce(l.image_id, c.image_id) AS image_id, l.uri, l.size, l.etag,
            CASE
              WHEN l.image_id IS NULL THEN 'deleted'
              WHEN c.image_id IS NULL THEN 'new'
              WHEN l.etag IS NOT NULL AND c.etag IS DISTINCT FROM l.etag THEN 'changed'
              WHEN c.status <> 'ok' THEN 'retry'
              ELSE 'unchanged'
            END AS change
          FROM {listing} l FULL OUTER JOIN current_rows c ON l.image_id = c.image_id)
        """.replace("$full", "TRUE" if config.full else "FALSE")
    )
    by_change = dict(con.execute("SELECT change, count(*) FROM classified GROUP BY change").fetchall())
    counts = {k: int(by_change.get(k, 0)) for k in ("new", "changed", "retry", "unchanged")}
    counts["listed"] = sum(counts.values())
    counts["deleted"] = int(by_change.get("deleted", 0))

    if config.full:
        wanted = "change <> 'deleted'"
    elif config.reprocess_errors:
        wanted = "change IN ('new', 'changed', 'retry')"
    else:
        wanted = "change IN ('new', 'changed')"
    limit = f"LIMIT {int(config.limit)}" if config.limit else ""
    todo_path = os.path.join(spill_dir, "todo.parquet")
    con.execute(
        f"COPY (SELECT image_id, uri, size, etag, change FROM classified WHERE {wanted} ORDER BY image_id {limit}) "
        f"TO '{todo_path}' (FORMAT parquet, ROW_GROUP_SIZE 10000)"
    )
    plan = Plan(spill_dir=spill_dir, todo_path=todo_path, counts=counts)
    if config.prune and counts["deleted"]:
        deleted_path = os.path.join(spill_dir, "deleted.parquet")
        con.execute(
            f"COPY (SELECT image_id FROM classified WHERE change = 'deleted' ORDER BY image_id) "
            f"TO '{deleted_path}' (FORMAT parquet)"
        )
        plan.deleted_ids_path = deleted_path
    return plan
