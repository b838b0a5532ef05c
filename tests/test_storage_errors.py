"""Only "not found" means absent: a failed S3 request (403, 500, 503, a dropped connection) during
recovery, publishing or compaction stops the step with the object's name, keeps the staged state,
and the next clean attempt ends with the tables of an uninterrupted run (no row lost or doubled).

Everything goes over HTTP through the fault-injecting proxy in front of the loopback S3 server.
"""

from __future__ import annotations

import json
import socket
import time

import pyarrow.parquet as pq
import pytest

from facebatch import publishing, recovery, storage, writing
from facebatch.out import Heartbeat, Out, active_heartbeats
from faulty_proxy import DROP, FaultyS3Proxy
from test_tables_plan import _faces_rows, _images_rows

BUCKET = "storage-errors"


@pytest.fixture(autouse=True)
def few_sdk_attempts(monkeypatch):
    """pyarrow's default of 10 attempts backs off for about 90 s on a request that keeps failing:
    3 keep these tests of lasting failures short (transient faults here last at most 2 requests)."""
    monkeypatch.setenv("FACEBATCH_S3_MAX_ATTEMPTS", "3")


@pytest.fixture(scope="module")
def proxy(s3_server):
    s3_server.client().create_bucket(Bucket=BUCKET)
    p = FaultyS3Proxy(s3_server.endpoint)
    yield p
    p.stop()


@pytest.fixture()
def out(proxy, request):
    """A fresh OUT prefix per test; faults are cleared afterwards."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)
    yield Out.from_uri(f"s3://{BUCKET}/{name}", proxy.endpoint)
    proxy.clear_faults()


def stage(out, run_id, ids, etags, record=True):
    """A run that finished writing (READY + record) and whose driver died before publishing."""
    writer = writing.RunWriter(out, run_id)
    writer.write("faces", _faces_rows(ids, run_id=run_id))
    writer.write("images", _images_rows(ids, etags, ["ok"] * len(ids), run_id=run_id))
    writer.close()
    writer.heartbeat.stop()
    if record:
        out.write_json(out.join("_staging", run_id, "record.json"), {"run_id": run_id})


def publish(out, run_id, ids, etags):
    stage(out, run_id, ids, etags)
    publishing.publish_run(out, run_id, {"run_id": run_id})


def keys(s3_server, out, under=""):
    listed = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=out.join(under).path + "/")
    return sorted(o["Key"][len(out.location.path) + 1:] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))


def visible(out, table="images"):
    """(image_id, etag or face_index, run_id) rows a reader of OUT/<table>/*.parquet sees."""
    fs = out.fs
    rows = []
    for path in out.list_table_files(table):
        t = pq.read_table(path, filesystem=fs)
        second = "etag" if table == "images" else "face_index"
        rows += zip(t["image_id"].to_pylist(), t[second].to_pylist(), t["run_id"].to_pylist())
    return sorted(rows)


def test_failed_get_of_ready_never_discards_a_finished_run(proxy, out, s3_server):
    publish(out, "run-0", ["a", "b"], ["e1", "e1"])
    stage(out, "run-1", ["b", "c"], ["e2", "e1"])  # b changed, c new
    staged_before = keys(s3_server, out, "_staging")
    proxy.inject("GET", "/_staging/run-1/READY", status=403)
    with pytest.raises(storage.StorageError, match=r"GET s3://.*/_staging/run-1/READY: "):
        recovery.recover_staging(out)
    assert keys(s3_server, out, "_staging") == staged_before  # nothing deleted, nothing published
    assert visible(out) == [("a", "e1", "run-0"), ("b", "e1", "run-0")]

    proxy.clear_faults()
    assert recovery.recover_staging(out) == [{"run_id": "run-1", "action": "published"}]
    assert visible(out) == [("a", "e1", "run-0"), ("b", "e2", "run-1"), ("c", "e1", "run-1")]
    assert visible(out, "faces") == [("a", 0, "run-0"), ("b", 0, "run-1"), ("c", 0, "run-1")]


@pytest.mark.parametrize("status", [500, 503, DROP], ids=["500", "503", "dropped"])
def test_a_get_failing_for_good_aborts_recovery_with_the_objects_name(proxy, out, s3_server, status):
    """Errors the SDK retries (5xx, a dropped connection) still end as an error, never as 'absent'."""
    stage(out, "run-1", ["a"], ["e1"])
    proxy.inject("GET", "/_staging/run-1/record.json", status=status)
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match=r"GET s3://.*/_staging/run-1/record.json"):
        recovery.recover_staging(out)
    assert time.perf_counter() - t0 < 60
    assert "_staging/run-1/READY" in keys(s3_server, out, "_staging")
    proxy.clear_faults()
    assert recovery.recover_staging(out) == [{"run_id": "run-1", "action": "published"}]
    assert visible(out) == [("a", "e1", "run-1")]


def test_throttled_requests_are_retried_by_every_client(proxy, out):
    """S3's 503 SlowDown is its normal answer under load: pyarrow (GET of READY) and boto3 (HEAD and
    COPY of a staged file) retry it, and recovery succeeds."""
    stage(out, "run-1", ["a"], ["e1"])
    ready = proxy.inject("GET", "/_staging/run-1/READY", status=503, times=2)
    head = proxy.inject("HEAD", "/_staging/run-1/faces.parquet", status=503, times=2)
    copy = proxy.inject("COPY", "/images/run-1.parquet", status=503, times=2)
    assert recovery.recover_staging(out) == [{"run_id": "run-1", "action": "published"}]
    assert (ready.served, head.served, copy.served) == (2, 2, 2)
    assert visible(out) == [("a", "e1", "run-1")]


def test_failed_heartbeat_get_never_makes_a_live_run_look_dead(proxy, out, s3_server):
    fs = out.fs
    # A run on another machine, writing right now: a fresh heartbeat and a partial staged file.
    out.write_json(out.join("_staging", "run-live", "HEARTBEAT"), {"host": "elsewhere", "pid": 1, "time": time.time()})
    with fs.open_output_stream(out.join("_staging", "run-live", "images.parquet").fs_path()) as fh:
        fh.write(b"partial")
    proxy.inject("GET", "/_staging/run-live/HEARTBEAT", status=503)
    with pytest.raises(storage.StorageError, match="HEARTBEAT"):
        recovery.recover_staging(out)
    assert keys(s3_server, out, "_staging") == ["_staging/run-live/HEARTBEAT", "_staging/run-live/images.parquet"]
    proxy.clear_faults()
    assert recovery.recover_staging(out) == [{"run_id": "run-live", "action": "left alone: another run is writing it"}]


def test_first_heartbeat_write_failing_surfaces_the_s3_error(proxy, out):
    before = active_heartbeats()
    proxy.inject("*", "/_staging/run-hb/HEARTBEAT", status=403)
    with pytest.raises(storage.StorageError, match=r"write heartbeat s3://.*/_staging/run-hb/HEARTBEAT.*(ACCESS_DENIED|AccessDenied)"):
        writing.RunWriter(out, "run-hb")
    assert active_heartbeats() == before  # nothing left beating


def test_heartbeat_stop_is_safe_in_every_state(tmp_path):
    location = storage.parse_location(str(tmp_path / "HEARTBEAT"))
    beat = Heartbeat(Out(location), location)
    assert json.loads((tmp_path / "HEARTBEAT").read_text())["host"] == socket.gethostname()
    beat.stop()
    beat.stop()
    half_made = Heartbeat.__new__(Heartbeat)  # as if __init__ had failed at its first beat
    half_made._thread = None
    half_made._stop = __import__("threading").Event()
    half_made.stop()


@pytest.mark.parametrize("op, key", [("COPY", "/faces/run-2.parquet"), ("DELETE", "/_staging/run-2/faces.parquet"),
                                     ("HEAD", "/_staging/run-2/images.parquet")])
def test_failed_publish_step_is_finished_by_the_next_recovery(proxy, out, op, key):
    publish(out, "run-1", ["a", "b"], ["e1", "e1"])
    stage(out, "run-2", ["b"], ["e2"])
    proxy.inject(op, key, status=403)
    with pytest.raises(storage.StorageError, match=key.rsplit("/", 1)[1]):
        publishing.publish_run(out, "run-2", {"run_id": "run-2"})
    ids = [r[0] for r in visible(out)]
    assert len(ids) == len(set(ids))  # never two versions of an image
    proxy.clear_faults()
    assert recovery.recover_staging(out) == [{"run_id": "run-2", "action": "published"}]
    assert visible(out) == [("a", "e1", "run-1"), ("b", "e2", "run-2")]
    assert visible(out, "faces") == [("a", 0, "run-1"), ("b", 0, "run-2")]


def test_failed_delete_during_compaction_keeps_the_journal(proxy, out, s3_server):
    from facebatch.compact import compact

    for night in range(3):
        publish(out, f"run-{night}", [f"n{night}-a", f"n{night}-b"], ["e", "e"])
    expected_images, expected_faces = visible(out), visible(out, "faces")
    proxy.inject("DELETE", "/faces/run-1.parquet", status=503)
    with pytest.raises(storage.StorageError, match=r"journal is kept.*faces/run-1.parquet"):
        compact(out)
    staged = keys(s3_server, out, "_staging")
    journal_key = next(k for k in staged if k.endswith("/compact.json"))
    compaction_id = journal_key.split("/")[1]
    # Until the journal is finished the old file shows beside the merged one (duplicates):
    # a transient state that the next compact or index run ends.
    assert len(visible(out, "faces")) > len(expected_faces)

    proxy.clear_faults()
    proxy.inject("GET", journal_key, status=403)
    with pytest.raises(storage.StorageError, match="compact.json"):
        recovery.recover_staging(out)
    assert journal_key in keys(s3_server, out, "_staging")  # a failed GET never drops the journal

    proxy.clear_faults()
    assert recovery.recover_staging(out) == [{"run_id": compaction_id, "action": "finished compaction"}]
    assert visible(out) == expected_images
    assert visible(out, "faces") == expected_faces
    assert [p.rsplit("/", 1)[1] for p in out.list_table_files("faces")] == [f"{compaction_id}-00000.parquet"]
    assert keys(s3_server, out, "_staging") == []


def test_failed_staging_cleanup_after_compaction_fails_loudly_and_heals(proxy, out, s3_server):
    from facebatch.compact import compact

    for night in range(2):
        publish(out, f"run-{night}", [f"n{night}"], ["e"])
    expected = visible(out, "faces")
    proxy.inject("DELETE", "/_staging/compact-", status=403)  # one by one, or in a batch (DeleteObjects)
    with pytest.raises(storage.StorageError, match="_staging/compact-"):
        compact(out)
    proxy.clear_faults()
    report = compact(out)
    assert report["tables"]["faces"]["files_before"] == 1  # the first compaction had finished its swap
    assert visible(out, "faces") == expected
    assert keys(s3_server, out, "_staging") == []


def test_recovery_leaves_folders_that_are_not_run_ids_alone(tmp_path):
    location = Out.from_uri(str(tmp_path / "out"))
    odd = tmp_path / "out" / "_staging" / "-weird name"
    odd.mkdir(parents=True)
    (odd / "READY").write_text("{}")
    assert recovery.recover_staging(location) == [{"run_id": "-weird name", "action": "left alone: not a run id"}]
    assert odd.exists()



def test_a_heartbeat_still_running_at_exit_stops_quietly(s3_server):
    """A process that exits with a heartbeat running (a test, or a driver that never stopped one)
    stops it before pyarrow finalizes S3, instead of its thread dying on "S3 subsystem is finalized"."""
    import os
    import subprocess
    import sys

    s3_server.client().create_bucket(Bucket="exit-beats")
    script = (
        "import atexit, time\n"
        # Registered before pyarrow is imported, so it runs after pyarrow's exit handler finalized
        # S3: the time a beat needs to hit the finalized subsystem, deterministically.
        "atexit.register(time.sleep, 0.3)\n"
        "import facebatch.out as o\n"
        "o.HEARTBEAT_SECONDS = 0.005\n"
        f"o.Heartbeat.start(o.Out.from_uri('s3://exit-beats/out', {s3_server.endpoint!r}), 'run-left')\n"
        "time.sleep(0.3)\n"  # then exit with it beating
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **s3_server.env()})
    assert done.returncode == 0, done.stderr
    assert "Exception in thread" not in done.stderr and "finalized" not in done.stderr, done.stderr
    assert s3_server.client().head_object(Bucket="exit-beats", Key="out/_staging/run-left/HEARTBEAT")
