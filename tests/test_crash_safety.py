"""SIGKILL the driver at several points, rerun, and compare with an uninterrupted run.

Every crash point on local disk and on S3 (moto_server), for a first run and for a nightly run
that replaces a changed photo. Staging is done once per store and copied for the points after it
(see PUBLISH_POINTS); the runs share one local Ray instance (see shared_ray).

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


# The module's runs share one local Ray instance (started once, below) instead of each `index`
# starting and stopping its own: a killed driver is one job ending on it. A run that must start
# its own (its workers read fault variables from the driver's environment) passes own_ray=True.
_RAY: dict[str, str] = {}  # the variables that point a driver at it
RAY_HOLDER = """
import sys
import ray
ray.init(num_cpus=2, num_gpus=0, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test module is done with it
ray.shutdown()
"""


@pytest.fixture(scope="module", autouse=True)
def shared_ray():
    import secrets

    # Ray's token authentication stays on: the instance and its drivers share a token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth}
    env.pop("RAY_ADDRESS", None)
    holder = subprocess.Popen([sys.executable, "-c", RAY_HOLDER], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    address = holder.stdout.readline().strip()
    assert address, f"the shared Ray instance did not start (exit {holder.poll()})"
    _RAY.update(auth, RAY_ADDRESS=address)
    try:
        yield address
    finally:
        _RAY.clear()
        holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def index(source: Path, out: Path | str, extra_env: dict[str, str] | None = None, *extra_args: str,
          own_ray: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    if _RAY and not own_ray:
        env.update(_RAY)
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


# Where the index job itself dies (rows half written; staged, no record): the whole job runs per case.
PIPELINE_POINTS = ["write-after-first-batch", "staged-before-record"]
# Where it dies once the run is staged: staging is the same work for every such point, so it runs
# once per store (killed at staged-after-record) and each case starts from a copy of that state.
# A publish-* point then kills the next `index` in the same publish_run that the job calls after
# staging (here: its recovery of the staged run, before any Ray work), so the same files are
# half moved when the driver dies.
PUBLISH_POINTS = ["staged-after-record", "publish-after-faces"]
assert sorted(PIPELINE_POINTS + PUBLISH_POINTS) == sorted(CRASH_POINTS)


def copy_out(src: Path | str, dst: Path | str) -> None:
    """A copy of an OUT (a local folder, or every object under an s3:// prefix, copied server-side)."""
    import shutil

    if isinstance(src, Path):
        shutil.copytree(src, dst)
        return
    from facebatch import storage

    client = storage.s3_client()
    source, target = storage.parse_location(src), storage.parse_location(dst)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.path + "/"):
        for item in page.get("Contents", []):
            key = target.path + item["Key"][len(source.path):]
            client.copy_object(Bucket=target.bucket, Key=key, CopySource={"Bucket": source.bucket, "Key": item["Key"]})


def staged_then_killed(source: Path, out: Path | str, extra_env: dict[str, str] | None = None) -> None:
    """Index SOURCE into OUT and SIGKILL the driver once the run is staged with its record."""
    crashed = index(source, out, {"FACEBATCH_FAULT_POINT": "staged-after-record", **(extra_env or {})})
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])


@pytest.fixture(scope="module")
def staged(archive_and_baseline, tmp_path_factory, s3_out):
    """Per store, made on first use: an OUT whose driver was killed right after staging the run."""
    made: dict[str, Path | str] = {}

    def get(store: str) -> Path | str:
        if store not in made:
            out = tmp_path_factory.mktemp("staged") / "out" if store == "local" else f"{s3_out}/staged"
            staged_then_killed(archive_and_baseline[0], out)
            made[store] = out
        return made[store]

    return get


STORES = ["local", "s3"]


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_driver_killed_then_rerun_matches_uninterrupted_run(archive_and_baseline, staged, s3_out, tmp_path, store, point):
    """On local disk and on S3 (moto_server: publishing is server-side copies, not renames)."""
    out = tmp_path / "out" if store == "local" else f"{s3_out}/{point}"
    source = archive_and_baseline[0]
    if point in PIPELINE_POINTS:
        crashed = index(source, out, {"FACEBATCH_FAULT_POINT": point})
        assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])
    else:
        copy_out(staged(store), out)
        if point != "staged-after-record":
            crashed = index(source, out, {"FACEBATCH_FAULT_POINT": point})
            assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])
    _killed_then_rerun(archive_and_baseline, out)


def _killed_then_rerun(archive_and_baseline, out):
    source, images, faces = archive_and_baseline
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
                                           "FACEBATCH_FAULT_KILL_READ_TASK_ONCE": str(task_marker)}, "--decode-tasks",
                own_ray=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert actor_marker.exists() and task_marker.exists()  # the faults really happened
    assert visible(tmp_path / "out") == (images, faces)


@pytest.fixture(scope="module")
def changed_archive(archive_and_baseline, tmp_path_factory, s3_out):
    """A nightly rerun that replaces a changed photo's rows, staged once per store.

    The demo archive (a copy) indexed on local disk and on S3; then the coffee photo replaced by a
    portrait (new bytes, new etag, now with a face). expected: the next run's tables, uninterrupted
    (on local disk: the same rows as on S3, image ids being the sources' paths); staged_for(store):
    an OUT where that next run was killed once staged (made on first use).
    """
    import shutil

    root = tmp_path_factory.mktemp("changed")
    archive = root / "archive"
    shutil.copytree(archive_and_baseline[0], archive)
    first = {"local": root / "first", "s3": f"{s3_out}/changed-first"}
    for out in first.values():
        run = index(archive, out)
        assert run.returncode == 0, run.stderr[-3000:]
    assert visible(first["s3"]) == visible(first["local"])
    changed = archive / "scenery" / "coffee.jpg"
    changed.write_bytes((archive / "portraits" / "astronaut.jpg").read_bytes())
    shutil.copytree(first["local"], root / "expected")
    expected_run = index(archive, root / "expected")
    assert expected_run.returncode == 0 and "changed 1" in expected_run.stdout, expected_run.stdout
    expected = visible(root / "expected")
    assert any(r[0] == str(changed) for r in expected[1])  # the new version's face is there
    made: dict[str, Path | str] = {}

    def staged_for(store: str) -> Path | str:
        if store not in made:
            out = root / "staged" if store == "local" else f"{s3_out}/changed-staged"
            copy_out(first[store], out)
            staged_then_killed(archive, out)
            made[store] = out
        return made[store]

    return archive, staged_for, expected


@pytest.mark.parametrize("store,point", [("local", "publish-after-supersede"), ("local", "publish-after-faces"),
                                         ("s3", "publish-after-supersede"), ("s3", "publish-after-faces")])
def test_crash_while_publishing_a_changed_object(changed_archive, s3_out, tmp_path, store, point):
    """A nightly rerun replaces a changed photo's rows; a crash mid-publish never shows two versions.
    On S3 the supersede step rewrites published objects (server-side copies over them)."""
    archive, staged_for, expected = changed_archive
    out = tmp_path / "out" if store == "local" else f"{s3_out}/changed-{point}"
    copy_out(staged_for(store), out)
    crashed = index(archive, out, {"FACEBATCH_FAULT_POINT": point})
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])
    seen_images, seen_faces = visible(out)
    ids = [r[0] for r in seen_images]
    assert len(ids) == len(set(ids))  # never two versions of one image
    assert len({(r[0], r[1]) for r in seen_faces}) == len(seen_faces)
    rerun = index(archive, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert visible(out) == expected
    assert staged_leftovers(out) == []
