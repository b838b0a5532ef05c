"""DuckDB over the published tables: `connect(OUT)` gives views `images`, `faces`, `people` and `face_people`.

DuckDB extensions cannot be downloaded on air-gapped clusters (nor here), so httpfs (S3) and vss
(HNSW indexes) are loaded from the `duckdb-extension-*` wheels when they are installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlparse

import duckdb

from . import storage
from .out import Out
from .publishing import rewritten_name
from .tables import PEOPLE_TABLES, TABLES


def extension_file(name: str) -> Path | None:
    """The .duckdb_extension file shipped by the `duckdb-extension-<name>` wheel, if installed."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob(f"{name}.duckdb_extension"))
    return found[0] if found else None


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    path = extension_file(name)
    try:
        if path is not None:
            con.install_extension(str(path))
        con.load_extension(name)
    except duckdb.Error as exc:
        raise RuntimeError(f"DuckDB extension {name!r} is not available: pip install duckdb-extension-{name}=={duckdb.__version__} ({exc})") from exc


# DuckDB's httpfs retries a failed request (I/O errors, throttling, 5xx) this many times with
# exponential backoff: 0.2 s, 0.4 s, 0.8 s ... (about 100 s in all with the default 10 attempts).
HTTP_RETRY_WAIT_MS = 200
HTTP_RETRY_BACKOFF = 2.0


def configure_s3(con: duckdb.DuckDBPyConnection, endpoint: str | None = None) -> None:
    """An S3 secret that finds its credentials itself (the AWS SDK's default chain: environment,
    profile, web identity, instance role) and a custom endpoint, if any; retries like the other
    clients (FACEBATCH_S3_MAX_ATTEMPTS).

    No credential is ever pasted into SQL text (which DuckDB may log or show in errors): the
    `aws` extension's credential_chain provider reads them from the environment.
    """
    load_extension(con, "httpfs")
    load_extension(con, "aws")
    endpoint = storage.endpoint_url(endpoint)
    retries = max(1, storage.s3_max_attempts() - 1)
    con.execute(f"SET http_retries = {retries}")
    con.execute(f"SET http_retry_wait_ms = {HTTP_RETRY_WAIT_MS}")
    con.execute(f"SET http_retry_backoff = {HTTP_RETRY_BACKOFF}")
    params = ["TYPE s3", "PROVIDER credential_chain"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        params.append(f"REGION {_quote(region)}")
    if endpoint:
        parsed = urlparse(endpoint)
        params.append(f"ENDPOINT {_quote(parsed.netloc)}")
        params.append("URL_STYLE 'path'")
        params.append(f"USE_SSL {'true' if parsed.scheme == 'https' else 'false'}")
    con.execute(f"CREATE OR REPLACE SECRET facebatch_s3 ({', '.join(params)})")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect(out: str | Out, endpoint: str | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views `images`, `faces`, `people` and `face_people` over OUT's published Parquet files.

    `out` is OUT's URI (with `endpoint`), or the Out of a run (which carries its endpoint)."""
    con = duckdb.connect(database)
    out = out if isinstance(out, Out) else Out.from_uri(out, endpoint)
    if out.is_s3:
        configure_s3(con, out.endpoint)
    create_views(con, out)
    return con


def create_views(con: duckdb.DuckDBPyConnection, out: Out) -> None:
    """(Re)create the views over what OUT holds now (S3 configured on `con` already).

    Normally a view globs OUT/<table>/*.parquet. While a publish or a compaction is half done
    (it failed, or it is running), the views read through its staged state instead, so that a
    reader sees the tables before it or after it, never a mix and never a row twice:
    - a compaction whose journal is written: its merged files once all are in place (the old
      files hidden, even those not deleted yet), else the old files (merged ones hidden);
    - an index run whose staged files are complete (READY and record.json: recovery publishes it,
      never discards it) but whose images are not published yet: its staged rows, and the older
      rows it replaces or prunes hidden, whether the supersede step removed them already or not
      (and of a file it rewrote under a new name, only the new one).
    """
    pending = pending_changes(out)
    for name, schema in TABLES.items():
        present = out.list_table_files(name)
        runs = pending.runs
        # A pending run's supersede step writes each file it rewrites under a new name, then
        # deletes the old one: where both exist, the old one is not read (its rows are in the new).
        rewritten = {f for f in present for run in runs
                     if f.rsplit("/", 1)[0] + "/" + rewritten_name(f.rsplit("/", 1)[1], run["run_id"]) in present}
        files = [f for f in present if f not in pending.hidden and f not in rewritten]
        own = {f"{name}/{run['run_id']}.parquet" for run in runs}
        files = [f for f in files if not any(f.endswith("/" + o) for o in own)] if runs else files
        parts = _literal_list(out, files)
        if not runs:
            if not files:
                # A new OUT, or no face found yet: an empty table with the contract's columns.
                con.register(f"_empty_{name}", schema.empty_table())
                con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")
            elif pending.hidden:
                con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{parts}])")
            else:
                glob = out.table_glob(name)
                con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_sql_string(glob)})")
            continue
        con.register(f"_empty_{name}", schema.empty_table())
        sql = f"SELECT * FROM read_parquet([{parts}])" if files else f"SELECT * FROM _empty_{name}"
        for run in runs:  # in run id order, as recovery publishes them
            keys = f"SELECT image_id, pipeline_version FROM read_parquet({_sql_string(run['images'])})"
            sql = f"SELECT p.* FROM ({sql}) p ANTI JOIN ({keys}) r USING (image_id, pipeline_version)"
            if run["prune"]:
                sql += f" WHERE p.image_id NOT IN (SELECT image_id FROM read_parquet({_sql_string(run['prune'])}))"
            source = run[name]
            if source:
                sql = f"{sql} UNION ALL SELECT * FROM read_parquet({_sql_string(source)})"
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    _people_views(con, out)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"  # paths may contain quotes


def _literal_list(out: Out, fs_paths: list[str]) -> str:
    return ", ".join(_sql_string(out.uri_of(p)) for p in fs_paths)


class PendingChanges:
    """What a reader of OUT must correct for right now (see `create_views`)."""

    def __init__(self) -> None:
        self.hidden: set[str] = set()  # fs paths of published table files not to read
        self.runs: list[dict] = []  # committed index runs not fully published: where their rows are


def pending_changes(out: Out) -> PendingChanges:
    import pyarrow.fs as pafs

    from .config import ConfigError, check_run_id

    pending = PendingChanges()
    staging = out.staging_root()
    try:
        infos = out.fs.get_file_info(pafs.FileSelector(staging.fs_path(), recursive=True, allow_not_found=True))
    except OSError as exc:
        raise storage.storage_error("LIST", staging.uri(), exc) from exc
    base = staging.fs_path().rstrip("/") + "/"
    staged: dict[str, set[str]] = {}
    for info in infos:
        if info.type == pafs.FileType.File and info.path.startswith(base):
            run_id, _, rest = info.path[len(base):].partition("/")
            staged.setdefault(run_id, set()).add(rest)
    for run_id in sorted(staged):
        names = staged[run_id]
        try:
            check_run_id(run_id)
        except ConfigError:
            continue  # not facebatch's: recovery leaves it alone, and so do readers
        folder = out.staging(run_id)
        if run_id.startswith("compact-") and "compact.json" in names:
            journal = out.read_json(folder.join("compact.json"))
            if journal is None:
                continue
            present = {f for name in TABLES for f in out.list_table_files(name)}
            finals = {item["final"] for item in journal["add"]}
            # The old files go only once every merged file is in place (finish_compaction).
            pending.hidden |= set(journal["remove"]) if finals <= present else finals
        elif not run_id.startswith(("compact-", "people-")) and {"READY", "record.json", "images.parquet"} <= names:
            published_faces = out.table_file("faces", run_id)
            try:
                faces_published = out.fs.get_file_info(published_faces.fs_path()).type == pafs.FileType.File
            except OSError as exc:
                raise storage.storage_error("HEAD", published_faces.uri(), exc) from exc
            pending.runs.append({
                "run_id": run_id,
                "images": folder.join("images.parquet").uri(),
                "faces": published_faces.uri() if faces_published
                else folder.join("faces.parquet").uri() if "faces.parquet" in names else None,
                "prune": folder.join("prune.parquet").uri() if "prune.parquet" in names else None,
            })
    return pending


def _people_views(con: duckdb.DuckDBPyConnection, out: Out) -> None:
    """Views `people` and `face_people`: the committed generation of every pipeline version
    (read through its pointer, so a people run being published is seen whole or not at all)."""
    generations = out.people_generations()
    for name, schema in PEOPLE_TABLES.items():
        uris = [out.generation_file(pointer, name).uri() for pointer in generations.values()]
        if not uris:
            con.register(f"_empty_{name}", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        literal = ", ".join("'" + u.replace("'", "''") + "'" for u in uris)
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{literal}])")
