"""SIGKILL the driver at several points, rerun, and compare with an uninterrupted run.

Also: a killed inference actor and a killed read task neither fail the run nor lose rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CRASH_POINTS = ["write-after-first-batch", "staged-before-record", "staged-after-record", "publish-after-faces"]


def index(source: Path, out: Path | str, extra_env: dict[str, str] | None = None, *extra_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "facebatch.cli", "index", str(source), "--out", str(out), "--max-side", "1024",
         "--batch-size", "2", "--object-store-memory", str(200 * 1024 * 1024), *extra_args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


COLUMNS = (("images", "image_id, etag, status, num_faces, width, height"),
           ("faces", "image_id, face_index, round(box[1], 1), round(box[2], 1), round(score, 4)"))


def visible(out: Path | str) -> tuple[list, list]:
    """What a reader globbing OUT/<table>/*.parquet sees right now (a local folder or s3://)."""
    if isinstance(out, str):
        return visible_s3(out)
    con = duckdb.connect()
    result = []
    for name, cols in COLUMNS:
        files = list((out / name).glob("*.parquet")) if (out / name).is_dir() else []
        if not files:
            result.append([])
            continue
        result.append(con.sql(f"SELECT {cols} FROM read_parquet('{out}/{name}/*.parquet') ORDER BY ALL").fetchall())
    return result[0], result[1]


def visible_s3(out: str) -> tuple[list, list]:
    from facebatch.out import Out
    from facebatch.query import configure_s3

    con = duckdb.connect()
    configure_s3(con)
    location = Out.from_uri(out)
    result = []
    for name, cols in COLUMNS:
        if not location.list_table_files(name):
            result.append([])
            continue
        result.append(con.sql(f"SELECT {cols} FROM read_parquet('{location.table_glob(name)}') ORDER BY ALL").fetchall())
    return result[0], result[1]


def staged_leftovers(out: Path | str) -> list[str]:
    if isinstance(out, str):
        from facebatch import storage

        location = storage.parse_location(out)
        return [o.uri for o in storage.list_objects(location.join("_staging"))]
    return [str(p) for p in (out / "_staging").iterdir()] if (out / "_staging").exists() else []


@pytest.fixture(scope="module")
def s3_out(s3_server):
    """A bucket on the loopback S3 server for OUT (the sources stay local)."""
    s3_server.client().create_bucket(Bucket="crash-out")
    return "s3://crash-out"


@pytest.fixture(scope="module")
def archive_and_baseline(tmp_path_factory):
    from facebatch.demo import build_demo_archive

    root = tmp_path_factory.mktemp("crash")
    build_demo_archive(root)
    baseline = root / "baseline"
    run = index(root / "archive", baseline)
    assert run.returncode == 0, run.stderr[-4000:]
    images, faces = visible(baseline)
    assert len(images) == 9 and len(faces) >= 6
    return root / "archive", images, faces


S3_CRASH_POINTS = ["staged-after-record", "publish-after-faces"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_driver_killed_then_rerun_matches_uninterrupted_run(archive_and_baseline, tmp_path, point):
    _killed_then_rerun(archive_and_baseline, tmp_path / "out", point)


@pytest.mark.parametrize("point", S3_CRASH_POINTS)
def test_driver_killed_then_rerun_on_s3(archive_and_baseline, s3_out, point):
    """The same on S3 (moto_server): publishing is server-side copies, not renames."""
    _killed_then_rerun(archive_and_baseline, f"{s3_out}/{point}", point)


def _killed_then_rerun(archive_and_baseline, out, point):
    source, images, faces = archive_and_baseline
    crashed = index(source, out, {"FACEBATCH_FAULT_POINT": point})
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])
    seen_images, seen_faces = visible(out)
    # Never a partial run: each table shows nothing of it or all of it.
    assert seen_images in ([], images)
    assert seen_faces in ([], faces)
    rerun = index(source, out)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert visible(out) == (images, faces)
    assert staged_leftovers(out) == []
    # Exactly one published run record per published run; a rerun after a complete crash is quiet.
    again = index(source, out)
    assert again.returncode == 0 and "processed 0 images" in again.stdout
    assert visible(out) == (images, faces)


def test_killed_actor_and_read_task_lose_nothing(archive_and_baseline, tmp_path):
    source, images, faces = archive_and_baseline
    actor_marker, task_marker = tmp_path / "actor-killed", tmp_path / "task-killed"
    # --decode-tasks: fetch + decode in separate Ray tasks (as on GPU clusters), so both kinds of
    # worker are really there to kill.
    run = index(source, tmp_path / "out", {"FACEBATCH_FAULT_KILL_ACTOR_ONCE": str(actor_marker),
                                           "FACEBATCH_FAULT_KILL_READ_TASK_ONCE": str(task_marker)}, "--decode-tasks")
    assert run.returncode == 0, run.stderr[-4000:]
    assert actor_marker.exists() and task_marker.exists()  # the faults really happened
    assert visible(tmp_path / "out") == (images, faces)


@pytest.mark.parametrize("point", ["publish-after-supersede", "publish-after-faces"])
def test_crash_while_publishing_a_changed_object(archive_and_baseline, tmp_path, point):
    """A nightly rerun replaces a changed photo's rows; a crash mid-publish never shows two versions."""
    _crash_while_publishing_a_changed_object(archive_and_baseline, tmp_path, tmp_path / "out", point)


def test_crash_while_publishing_a_changed_object_on_s3(archive_and_baseline, tmp_path, s3_out):
    """The supersede step on S3 rewrites published objects (server-side copies over them)."""
    _crash_while_publishing_a_changed_object(archive_and_baseline, tmp_path, f"{s3_out}/changed", "publish-after-supersede")


def _crash_while_publishing_a_changed_object(archive_and_baseline, tmp_path, out, point):
    import shutil

    source, images, faces = archive_and_baseline
    archive = tmp_path / "archive"
    shutil.copytree(source, archive)
    first = index(archive, out)
    assert first.returncode == 0, first.stderr[-3000:]
    if isinstance(out, str):
        # The uninterrupted run to compare with, on local disk (same rows: image ids are the sources' paths).
        local = index(archive, tmp_path / "expected")
        assert local.returncode == 0, local.stderr[-3000:]
    # The coffee photo is replaced by a portrait: new bytes, new etag, now with a face.
    changed = archive / "scenery" / "coffee.jpg"
    changed.write_bytes((archive / "portraits" / "astronaut.jpg").read_bytes())
    if not isinstance(out, str):
        shutil.copytree(out, tmp_path / "expected")
    expected_run = index(archive, tmp_path / "expected")
    assert expected_run.returncode == 0 and "changed 1" in expected_run.stdout, expected_run.stdout
    expected = visible(tmp_path / "expected")

    crashed = index(archive, out, {"FACEBATCH_FAULT_POINT": point})
    assert crashed.returncode == -9
    seen_images, seen_faces = visible(out)
    ids = [r[0] for r in seen_images]
    assert len(ids) == len(set(ids))  # never two versions of one image
    assert len({(r[0], r[1]) for r in seen_faces}) == len(seen_faces)
    rerun = index(archive, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert visible(out) == expected
    assert staged_leftovers(out) == []
    assert any(r[0] == str(changed) for r in expected[1])  # the new version's face is there
