"""Plan a run: list SOURCE, compare with what OUT already holds, and yield the work in image_id order.

The listing is streamed to a local Parquet spill file and the comparison is one DuckDB query
(hash join + sort that spill to disk), so planning tens of millions of objects needs bounded
memory. The result comes back in Arrow batches, sorted by image_id, which is what keeps every
output file sorted (row-group statistics then make lookups by image_id cheap).
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

from . import storage, tables
from .config import ConfigError, IndexConfig

PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
        pa.field("mtime", pa.float64()),
    ]
)

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
LISTING_CHUNK = 100_000


@dataclass
class Plan:
    """The work of one run plus the counts the run record reports."""

    spill_dir: str
    todo_path: str
    counts: dict[str, int] = field(default_factory=dict)  # new, changed, retry, unchanged, deleted, listed
    deleted_ids_path: str | None = None

    def batches(self, rows: int = 10_000) -> Iterator[pa.RecordBatch]:
        for batch in pq.ParquetFile(self.todo_path).iter_batches(batch_size=rows):
            yield batch

    @property
    def num_todo(self) -> int:
        return pq.ParquetFile(self.todo_path).metadata.num_rows

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.spill_dir, ignore_errors=True)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def _listing_batches(config: IndexConfig) -> Iterator[pa.RecordBatch]:
    """The SOURCE as PLAN_SCHEMA batches (not yet sorted)."""
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


def _read_manifest(config: IndexConfig) -> pa.Table:
    location = storage.parse_location(config.source)
    fs = storage.arrow_filesystem(location, config.s3_endpoint_url())
    try:
        if config.source.lower().endswith(".csv"):
            with fs.open_input_stream(location.fs_path()) as fh:
                return pacsv.read_csv(fh, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        return pq.read_table(location.fs_path(), filesystem=fs)
    except FileNotFoundError as exc:
        raise ConfigError(f"manifest {config.source} does not exist") from exc
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"manifest {config.source} could not be parsed: {exc}") from exc


def _manifest_batches(config: IndexConfig) -> Iterator[pa.RecordBatch]:
    manifest = _read_manifest(config)
    if "uri" not in manifest.column_names:
        raise ConfigError(
            f"manifest {config.source} has no 'uri' column (columns: {', '.join(manifest.column_names)}); "
            "it needs 'uri' and may have 'image_id', 'etag', 'size'"
        )
    n = manifest.num_rows
    uri = manifest.column("uri").cast(pa.string())
    if uri.null_count:
        raise ConfigError(f"manifest {config.source} has {uri.null_count} empty uri values")

    def optional(name: str, typ: pa.DataType, default):
        if name in manifest.column_names:
            return manifest.column(name).cast(typ)
        return default

    image_id = optional("image_id", pa.string(), uri)
    if image_id.null_count:
        raise ConfigError(f"manifest {config.source} has {image_id.null_count} empty image_id values")
    table = pa.table(
        {
            "image_id": image_id,
            "uri": uri,
            "size": optional("size", pa.int64(), pa.nulls(n, pa.int64())),
            "etag": optional("etag", pa.string(), pa.nulls(n, pa.string())),
            "mtime": pa.nulls(n, pa.float64()),
        },
        schema=PLAN_SCHEMA,
    )
    if storage.parse_location(config.source).is_s3:
        # A manifest on S3 names S3 objects only: were it to name local paths, whoever can write
        # to the bucket could make the workers read (and publish the errors of) their own files.
        local = pc.invert(pc.or_(pc.starts_with(uri, "s3://"), pc.starts_with(uri, "s3a://")))
        offenders = pc.filter(uri, local)
        if len(offenders):
            first = ", ".join(repr(u) for u in offenders.slice(0, 3).to_pylist())
            raise ConfigError(
                f"manifest {config.source} is on S3 but names {len(offenders)} local or relative path(s) "
                f"(first: {first}); a manifest on S3 may name only s3:// objects"
            )
    else:
        # Relative local paths in a manifest are relative to the manifest's folder.
        base = os.path.dirname(os.path.abspath(config.source))
        resolved = [u if u.startswith(("s3://", "s3a://", "/")) else os.path.join(base, u) for u in table["uri"].to_pylist()]
        table = table.set_column(1, "uri", pa.array(resolved, pa.string()))
    yield from table.to_batches(max_chunksize=LISTING_CHUNK)


def build_plan(config: IndexConfig, pipeline_version: str) -> Plan:
    """Plan a run; its spill folder is the caller's to remove (Plan.cleanup), unless planning fails."""
    spill_dir = tempfile.mkdtemp(prefix="facebatch-plan-")
    try:
        return _build_plan(config, pipeline_version, spill_dir)
    except BaseException:
        Plan(spill_dir=spill_dir, todo_path="").cleanup()
        raise


def _build_plan(config: IndexConfig, pipeline_version: str, spill_dir: str) -> Plan:
    listing_path = os.path.join(spill_dir, "listing.parquet")
    with pq.ParquetWriter(listing_path, PLAN_SCHEMA) as writer:
        for batch in _listing_batches(config):
            writer.write_batch(batch)

    out = storage.parse_location(config.out)
    existing = tables.read_existing_images(
        out, ["image_id", "etag", "status", "pipeline_version", "indexed_at"], config.s3_endpoint_url()
    )
    con = duckdb.connect()
    con.execute(f"SET temp_directory='{spill_dir}'")
    con.execute("SET preserve_insertion_order=false")
    con.register("existing_images", existing)
    con.execute(f"CREATE VIEW listing AS SELECT * FROM read_parquet('{listing_path}')")
    duplicate = con.execute(
        "SELECT image_id, count(*) FROM listing GROUP BY image_id HAVING count(*) > 1 LIMIT 1"
    ).fetchone()
    if duplicate:
        raise ConfigError(f"SOURCE lists image_id {duplicate[0]!r} {duplicate[1]} times; image ids must be unique")

    # The latest row per image_id for this pipeline version decides what happens to an object.
    con.execute(
        """
        CREATE VIEW current_rows AS
        SELECT image_id, etag, status FROM existing_images
        WHERE pipeline_version = $version
        QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY indexed_at DESC) = 1
        """.replace("$version", "'" + pipeline_version.replace("'", "''") + "'")
    )
    con.execute(
        """
        CREATE VIEW classified AS
        SELECT l.*,
          CASE
            WHEN c.image_id IS NULL THEN 'new'
            WHEN l.etag IS NOT NULL AND c.etag IS DISTINCT FROM l.etag THEN 'changed'
            WHEN c.status <> 'ok' THEN 'retry'
            ELSE 'unchanged'
          END AS change
        FROM listing l LEFT JOIN current_rows c USING (image_id)
        """
    )
    counts = dict(con.execute("SELECT change, count(*) FROM classified GROUP BY change").fetchall())
    counts = {k: int(counts.get(k, 0)) for k in ("new", "changed", "retry", "unchanged")}
    counts["listed"] = sum(counts.values())
    counts["deleted"] = int(
        con.execute("SELECT count(*) FROM current_rows c ANTI JOIN listing l USING (image_id)").fetchone()[0]
    )

    if config.full:
        wanted = "TRUE"
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
            f"COPY (SELECT image_id FROM current_rows ANTI JOIN listing USING (image_id) ORDER BY image_id) "
            f"TO '{deleted_path}' (FORMAT parquet)"
        )
        plan.deleted_ids_path = deleted_path
    con.close()
    return plan
