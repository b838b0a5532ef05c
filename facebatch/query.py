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

from . import storage, tables


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


def configure_s3(con: duckdb.DuckDBPyConnection, endpoint: str | None = None) -> None:
    """An S3 secret from the standard AWS environment (and a custom endpoint, if any)."""
    load_extension(con, "httpfs")
    endpoint = storage.endpoint_url(endpoint)
    params = ["TYPE s3", "PROVIDER credential_chain"]
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        params = ["TYPE s3", f"KEY_ID '{key}'", f"SECRET '{secret}'"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            params.append(f"SESSION_TOKEN '{os.environ['AWS_SESSION_TOKEN']}'")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        params.append(f"REGION '{region}'")
    if endpoint:
        parsed = urlparse(endpoint)
        params.append(f"ENDPOINT '{parsed.netloc}'")
        params.append("URL_STYLE 'path'")
        params.append(f"USE_SSL {'true' if parsed.scheme == 'https' else 'false'}")
    con.execute(f"CREATE OR REPLACE SECRET facebatch_s3 ({', '.join(params)})")


def connect(out: str, endpoint: str | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views `images`, `faces`, `people` and `face_people` over OUT's published Parquet files."""
    con = duckdb.connect(database)
    location = storage.parse_location(out)
    if location.is_s3:
        configure_s3(con, endpoint)
    for name, schema in tables.TABLES.items():
        if not tables.list_table_files(location, name, endpoint):
            # A new OUT, or no face found yet: an empty table with the contract's columns.
            con.register(f"_empty_{name}", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        glob = location.join(name).uri().rstrip("/") + "/*.parquet"
        literal = glob.replace("'", "''")  # paths may contain quotes
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{literal}')")
    _people_views(con, location, endpoint)
    return con


def _people_views(con: duckdb.DuckDBPyConnection, location: storage.Location, endpoint: str | None) -> None:
    """Views `people` and `face_people`: the committed generation of every pipeline version
    (read through its pointer, so a people run being published is seen whole or not at all)."""
    from .people import PEOPLE_TABLES, current_generations, generation_file

    generations = current_generations(location, endpoint)
    for name, schema in PEOPLE_TABLES.items():
        uris = [generation_file(location, pointer, name).uri() for pointer in generations.values()]
        if not uris:
            con.register(f"_empty_{name}", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        literal = ", ".join("'" + u.replace("'", "''") + "'" for u in uris)
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{literal}])")
