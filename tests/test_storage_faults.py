"""Transient S3 failures (throttling, 5xx) are retried with backoff; persistent ones become an error."""

from __future__ import annotations

import time

import pytest

from facebatch import storage
from facebatch.out import Out
from faulty_proxy import FaultyS3Proxy


@pytest.fixture()
def proxy(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="faults")
    for key in ("ok.jpg", "flaky-1.jpg", "broken-1.jpg"):
        client.put_object(Bucket="faults", Key=f"photos/{key}", Body=key.encode() * 100)
    p = FaultyS3Proxy(s3_server.endpoint, flaky_failures=3)
    yield p
    p.stop()


def test_throttled_object_is_fetched_after_retries(proxy):
    t0 = time.perf_counter()
    data = storage.fetch_bytes("s3://faults/photos/flaky-1.jpg", retries=5, endpoint=proxy.endpoint, base_delay=0.01)
    assert data == b"flaky-1.jpg" * 100
    assert proxy.failures_served["/faults/photos/flaky-1.jpg"] == 3
    assert time.perf_counter() - t0 < 30


def test_persistent_5xx_gives_up_with_a_clear_message(proxy):
    with pytest.raises(storage.FetchError) as info:
        storage.fetch_bytes("s3://faults/photos/broken-1.jpg", retries=2, endpoint=proxy.endpoint, base_delay=0.01)
    assert info.value.transient
    assert "InternalError" in str(info.value) and "gave up after 3 attempts" in str(info.value)


def test_missing_object_is_not_retried(proxy):
    before = sum(proxy.requests.values())
    with pytest.raises(storage.FetchError) as info:
        storage.fetch_bytes("s3://faults/photos/nope.jpg", retries=5, endpoint=proxy.endpoint, base_delay=0.01)
    assert not info.value.transient and "NoSuchKey" in str(info.value)
    assert sum(proxy.requests.values()) - before == 1


def test_listing_through_the_proxy(proxy):
    listed = [o.uri for o in storage.list_objects(storage.parse_location("s3://faults/photos/"), proxy.endpoint)]
    assert listed == ["s3://faults/photos/broken-1.jpg", "s3://faults/photos/flaky-1.jpg", "s3://faults/photos/ok.jpg"]


@pytest.mark.slow
def test_index_through_a_faulty_s3_gives_error_rows_and_goes_on(proxy, tmp_path):
    """End to end through the proxy: a throttled photo is indexed, one that keeps failing gets a
    fetch_failed row, and the run succeeds."""
    import io
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG")
    import boto3

    client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for key in ("flaky-2.jpg", "broken-2.jpg", "fine.jpg"):
        client.put_object(Bucket="faults", Key=f"run/{key}", Body=buf.getvalue())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "facebatch.cli", "index", "s3://faults/run", "--out", str(tmp_path / "out"),
         "--s3-endpoint", proxy.endpoint, "--fetch-retries", "2", "--object-store-memory", str(200 * 2**20)],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    import duckdb

    rows = dict(duckdb.sql(f"SELECT uri, status || ':' || coalesce(error, '') FROM read_parquet('{tmp_path}/out/images/*.parquet')").fetchall())
    assert rows["s3://faults/run/fine.jpg"] == "ok:"
    assert rows["s3://faults/run/flaky-2.jpg"] == "ok:"
    assert rows["s3://faults/run/broken-2.jpg"].startswith("fetch_failed:S3 InternalError")
    assert proxy.failures_served["/faults/run/flaky-2.jpg"] == 3


@pytest.mark.slow
def test_index_where_every_get_is_denied_fails_and_publishes_nothing(proxy, tmp_path):
    """Expired credentials or a missing permission is an outage, not a table of error rows: the run
    exits non-zero with the S3 error, publishes nothing, and leaves neither staging nor spill files."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import boto3

    client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for i in range(3):
        client.put_object(Bucket="faults", Key=f"denied/photo-{i}.jpg", Body=b"not fetched")
    proxy.inject("GET", "/faults/denied/", status=403)
    spill = tmp_path / "tmp"
    spill.mkdir()
    import tempfile

    # The plan's spill folder goes to TMPDIR; Ray's sockets stay where paths are short enough.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(spill), "RAY_TMPDIR": tempfile.gettempdir()}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "facebatch.cli", "index", "s3://faults/denied", "--out", str(tmp_path / "out"),
         "--s3-endpoint", proxy.endpoint, "--object-store-memory", str(200 * 2**20), "--run-id", "denied-run"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-4000:]
    assert "run denied-run failed: 3 of 3 objects could not be fetched" in run.stderr, run.stderr[-4000:]
    assert "AccessDenied" in run.stderr and "Traceback" not in run.stderr
    out = tmp_path / "out"
    assert not (out / "images").exists() and not (out / "_runs").exists()
    assert not (out / "_staging" / "denied-run").exists()
    assert not list(spill.glob("facebatch-plan-*"))


@pytest.mark.slow
def test_throttling_everywhere_ends_with_the_tables_of_a_clean_run(s3_server, tmp_path):
    """1 in 4 S3 requests of every kind (GET, HEAD, PUT, multipart, COPY, DELETE, LIST) answers 503
    SlowDown, for the fetches, the staged writes, the publish, the rerun's planning, a compaction and
    DuckDB's reads: every client retries, and the tables equal a clean run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from facebatch.compact import compact
    from facebatch.demo import build_demo_archive
    from facebatch.query import connect

    names = build_demo_archive(tmp_path / "demo")
    # Its own proxy: the demo archive has a folder named "broken", which the fixture's proxy fails for good.
    proxy = FaultyS3Proxy(s3_server.endpoint, flaky_marker="\0", broken_marker="\0")
    client = s3_server.client()
    client.create_bucket(Bucket="throttled")
    for path in sorted((tmp_path / "demo" / "archive").rglob("*")):
        if path.is_file():
            client.put_object(Bucket="throttled", Key="photos/" + path.relative_to(tmp_path / "demo" / "archive").as_posix(),
                              Body=path.read_bytes())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("FACEBATCH_S3_MAX_ATTEMPTS", None)  # the defaults are what is tested

    def index(out: str, endpoint: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "facebatch.cli", "index", "s3://throttled/photos", "--out", out, "--s3-endpoint", endpoint,
             "--max-side", "1024", "--batch-size", "4", "--object-store-memory", str(200 * 2**20)],
            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600,
        )

    def tables_of(out: str, endpoint: str) -> dict:
        con = connect(out, endpoint)
        try:
            return {
                "images": con.sql("SELECT image_id, etag, status, error, num_faces, width, height FROM images ORDER BY ALL").fetchall(),
                "faces": con.sql("SELECT image_id, face_index, box, score, embedding FROM faces ORDER BY ALL").fetchall(),
            }
        finally:
            con.close()

    clean = index("s3://throttled/clean", s3_server.endpoint)
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = tables_of("s3://throttled/clean", s3_server.endpoint)
    assert len(expected["images"]) == len(names) and expected["faces"]

    proxy.throttle(every=4)
    try:
        first = index("s3://throttled/slow", proxy.endpoint)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
        again = index("s3://throttled/slow", proxy.endpoint)  # planning against the published tables
        assert again.returncode == 0 and "processed 0 images" in again.stdout, again.stderr[-3000:]
        assert tables_of("s3://throttled/slow", proxy.endpoint) == expected  # DuckDB's reads, throttled
        compact(Out.from_uri("s3://throttled/slow", proxy.endpoint))
        assert tables_of("s3://throttled/slow", proxy.endpoint) == expected
        throttled = proxy.throttled
    finally:
        proxy.clear_faults()
        proxy.stop()
    assert throttled > 20, throttled  # the faults really happened, to many requests (46 in one run here)
    ops = {op for op, _ in proxy.operations}
    assert {"GET", "HEAD", "PUT", "POST", "COPY", "DELETE", "LIST"} <= ops, ops
    assert tables_of("s3://throttled/slow", s3_server.endpoint) == expected
