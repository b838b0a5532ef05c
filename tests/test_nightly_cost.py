"""A nightly run costs what changed: streamed manifests, S3 Inventory reports as SOURCE, planning
through DuckDB (local and S3/httpfs), and superseding that reads only the row groups it must."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from urllib.parse import quote_plus

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facebatch import publishing, tables, writing
from facebatch.out import Out
from facebatch.config import ConfigError, IndexConfig
from facebatch.plan import build_plan
from test_tables_plan import _faces_rows, _images_rows, _publish

KEYS = ["photos/2019/a b.jpg", "photos/2019/c+d.jpg", "photos/2020/ü.jpg", "photos/2020/x#1.jpg", "photos/folder/"]


def _rows(plan):
    return [r for b in plan.batches() for r in b.to_pylist()]


def _inventory_csv(keys, bucket="photos-src") -> bytes:
    # S3 Inventory CSV: no header, every field quoted, keys URL-encoded (form encoding).
    lines = [f'"{bucket}","{quote_plus(k, safe="/")}","{10 + i}","2024-01-0{1 + i % 9}T00:00:00.000Z","etag{i}"'
             for i, k in enumerate(keys)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _inventory_parquet(keys, bucket="photos-src") -> bytes:
    table = pa.table({"bucket": [bucket] * len(keys), "key": keys, "size": [10 + i for i in range(len(keys))],
                      "last_modified_date": [None] * len(keys), "e_tag": [f"etag{i}" for i in range(len(keys))],
                      "storage_class": ["STANDARD"] * len(keys)})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _write_inventory(client, fmt: str, keys_per_file: list[list[str]]) -> str:
    dest = "inventory-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=dest)
    prefix = "photos-src/daily"
    files = []
    for n, keys in enumerate(keys_per_file):
        data = _inventory_csv(keys) if fmt == "CSV" else _inventory_parquet(keys)
        key = f"{prefix}/data/{uuid.uuid4()}.{'csv.gz' if fmt == 'CSV' else 'parquet'}"
        client.put_object(Bucket=dest, Key=key, Body=data)
        files.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {
        "sourceBucket": "photos-src",
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": fmt,
        "files": files,
    }
    if fmt == "CSV":
        manifest["fileSchema"] = "Bucket, Key, Size, LastModifiedDate, ETag"
    else:
        manifest["fileSchema"] = "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); }"
    client.put_object(Bucket=dest, Key=f"{prefix}/2024-01-02T01-00Z/manifest.json", Body=json.dumps(manifest).encode())
    return f"s3://{dest}/{prefix}/2024-01-02T01-00Z/manifest.json"


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_report_as_source(s3_server, tmp_path, fmt):
    client = s3_server.client()
    source = _write_inventory(client, fmt, [KEYS[:2], KEYS[2:]])
    plan = build_plan(IndexConfig(source=source, out=str(tmp_path / "out")).validate(), "v")
    rows = _rows(plan)
    expected = sorted(f"s3://photos-src/{k}" for k in KEYS if not k.endswith("/"))
    assert [r["image_id"] for r in rows] == expected  # keys decoded, folder placeholder skipped
    assert [r["uri"] for r in rows] == expected
    by_uri = {r["uri"]: r for r in rows}
    assert by_uri["s3://photos-src/photos/2019/c+d.jpg"]["etag"] == "etag1"
    assert by_uri["s3://photos-src/photos/2020/ü.jpg"]["size"] == 10  # first row of the second file
    assert plan.counts["new"] == 4
    plan.cleanup()


def test_inventory_errors_are_clear(s3_server, tmp_path):
    client = s3_server.client()
    source = _write_inventory(client, "CSV", [KEYS[:1]])
    bucket, key = source[5:].split("/", 1)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    manifest["fileFormat"] = "ORC"
    client.put_object(Bucket=bucket, Key=key.replace("manifest", "orc/manifest"), Body=json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match="ORC format"):
        build_plan(IndexConfig(source=source.replace("manifest", "orc/manifest"), out=str(tmp_path / "o")).validate(), "v")
    manifest["fileFormat"] = "CSV"
    manifest["files"].append({"key": "nowhere/x.csv.gz", "size": 1, "MD5checksum": "0"})
    client.put_object(Bucket=bucket, Key=key.replace("manifest", "gone/manifest"), Body=json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match="does not exist"):
        build_plan(IndexConfig(source=source.replace("manifest", "gone/manifest"), out=str(tmp_path / "o")).validate(), "v")


def test_local_copy_of_an_inventory_report(tmp_path):
    data_dir = tmp_path / "inv" / "photos-src" / "daily" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "part.csv.gz").write_bytes(_inventory_csv(KEYS[:3]))
    manifest_dir = tmp_path / "inv" / "photos-src" / "daily" / "2024-01-02T01-00Z"
    manifest_dir.mkdir()
    (manifest_dir / "manifest.json").write_text(json.dumps({
        "sourceBucket": "photos-src", "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag",
        "files": [{"key": "photos-src/daily/data/part.csv.gz", "size": 1, "MD5checksum": "0"}]}))
    plan = build_plan(IndexConfig(source=str(manifest_dir / "manifest.json"), out=str(tmp_path / "out")).validate(), "v")
    assert [r["uri"] for r in _rows(plan)] == sorted(f"s3://photos-src/{k}" for k in KEYS[:3])
    plan.cleanup()


def test_manifest_is_streamed_in_blocks(tmp_path, monkeypatch):
    import facebatch.plan as plan_mod

    monkeypatch.setattr(plan_mod, "LISTING_CHUNK", 1000)
    rows = "".join(f"/p/{i:06d}.jpg,e{i}\n" for i in range(5000))
    path = tmp_path / "m.csv.gz"
    path.write_bytes(gzip.compress(("uri,etag\n" + rows).encode()))
    pq.write_table(pa.table({"uri": [f"/p/{i:06d}.jpg" for i in range(5000)]}), tmp_path / "m.parquet", row_group_size=1000)
    for source in (path, tmp_path / "m.parquet"):
        config = IndexConfig(source=str(source), out=str(tmp_path / "out")).validate()
        batches = list(plan_mod._listing_batches(config))
        if source.suffix == ".parquet":
            assert len(batches) == 5 and max(b.num_rows for b in batches) == 1000
        assert sum(b.num_rows for b in batches) == 5000
        plan = build_plan(config, "v")
        assert plan.counts["new"] == 5000
        plan.cleanup()


def test_plan_reads_the_published_images_on_s3_through_duckdb(s3_server, tmp_path):
    client = s3_server.client()
    bucket = "out-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/index"
    _publish(out, "run-1", ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"], ["e1", "e2", "e3"], ["ok", "ok", "corrupt"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,etag\n/p/a.jpg,e1\n/p/b.jpg,CHANGED\n/p/c.jpg,e3\n/p/d.jpg,e4\n")
    plan = build_plan(IndexConfig(source=str(manifest), out=out).validate(), "v1-test")
    assert plan.counts == {"new": 1, "changed": 1, "retry": 1, "unchanged": 1, "listed": 4, "deleted": 0}
    assert [(r["image_id"], r["change"]) for r in _rows(plan)] == [("/p/b.jpg", "changed"), ("/p/d.jpg", "new")]
    plan.cleanup()


def _compacted(out, n_files=3, rows_per_file=3000, row_group=500, version="v1-test"):
    """A compacted-like index: sorted files, several row groups each, faces for every image."""
    location = Out.from_uri(out)
    ids = [f"/p/{i:06d}.jpg" for i in range(n_files * rows_per_file)]
    for f in range(n_files):
        part = ids[f * rows_per_file:(f + 1) * rows_per_file]
        for name, table in (("images", _images_rows(part, ["e"] * len(part), ["ok"] * len(part), version, "old")),
                            ("faces", _faces_rows(part, version, "old"))):
            path = location.join(name, f"compact-x-{f:05d}.parquet").fs_path()
            location.ensure_parent_dir(path)
            pq.write_table(table.cast(tables.TABLES[name]), path, row_group_size=row_group)
    return ids


def test_superseding_reads_only_row_groups_that_can_hold_replaced_ids(tmp_path):
    out = str(tmp_path / "out")
    location = Out.from_uri(out)
    ids = _compacted(out)
    # The run: 2 changed objects (in file 1), 1 pruned (in file 2), 50 new (after every old id).
    changed = [ids[3100], ids[3101]]
    new = [f"/p/z{i:03d}.jpg" for i in range(50)]
    run_ids = sorted(changed + new)
    writer = writing.RunWriter(location, "run-2")
    writer.write("faces", _faces_rows(run_ids, run_id="run-2"))
    writer.write("images", _images_rows(run_ids, ["new"] * len(run_ids), ["ok"] * len(run_ids), run_id="run-2"))
    writer.close()
    pq.write_table(pa.table({"image_id": changed, "pipeline_version": ["v1-test"] * 2}),
                   location.replaced_ids("run-2").fs_path())
    pq.write_table(pa.table({"image_id": [ids[7000]]}), location.pruned_ids("run-2").fs_path())
    stats = publishing.SupersedeStats()
    assert publishing.remove_superseded(location, "run-2", stats) == 2 * 2 + 2  # images + faces rows
    # 6 row groups per file x 3 files x 2 tables; the run's ids fall in one row group of two files.
    assert stats.row_groups_total == 36 and stats.row_groups_probed == 4
    assert stats.files_rewritten == 4
    names = sorted(p.rsplit("/", 1)[1] for p in location.list_table_files("images"))
    assert names == ["compact-x-00000.parquet", "compact-x-00001-rrun-2.parquet", "compact-x-00002-rrun-2.parquet"]
    publishing.publish_run(location, "run-2", {"run_id": "run-2"})
    con = duckdb.connect()
    counts = con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM read_parquet('{out}/images/*.parquet')").fetchone()
    assert counts == (9000 - 1 + 50, 9000 - 1 + 50)
    assert con.execute(f"SELECT count(*) FROM read_parquet('{out}/faces/*.parquet') WHERE image_id = '{ids[3100]}'").fetchone()[0] == 1
    # Rewritten files keep their row groups one for one (less the removed rows), sorted, with statistics.
    meta = pq.ParquetFile(f"{out}/images/compact-x-00001-rrun-2.parquet").metadata
    assert meta.num_rows == 2998 and meta.num_row_groups == 6 and meta.row_group(0).num_rows == 498
    assert meta.row_group(0).column(0).statistics.has_min_max


def test_superseding_on_s3_never_overwrites_a_published_key(s3_server):
    client = s3_server.client()
    bucket = "out-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/index"
    _publish(out, "run-1", ["a", "b", "c"], ["e", "e", "e"], ["ok", "ok", "ok"])
    _publish(out, "run-2", ["b"], ["e2"], ["ok"])
    listed = client.list_objects_v2(Bucket=bucket, Prefix="index/images/")["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # (pyarrow leaves folder markers)
    assert keys == ["index/images/run-1-rrun-2.parquet", "index/images/run-2.parquet"]
    from facebatch.query import connect

    con = connect(out)
    assert con.sql("SELECT image_id, run_id FROM images ORDER BY 1").fetchall() == [("a", "run-1"), ("b", "run-2"), ("c", "run-1")]
