"""`ray start --head` + `ray job submit -- python jobs/index_archive.py ...`, ending with correct tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest
from s3server import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    import secrets

    # Its own token, not ~/.ray/auth_token, which every local Ray writes where it is missing.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    started: list[tuple[Path, int]] = []  # (temp dir, GCS port) of every start, stopped at the end
    try:  # also after a failed start: what it did start
        failures = []
        for _attempt in range(3):
            # Ray's sockets live under --temp-dir, and an AF_UNIX path may not exceed 107 bytes:
            # pytest's tmp paths (longer still under pytest-xdist's per-worker folders) are too deep.
            temp_dir = Path(tempfile.mkdtemp(prefix="fb-ray-"))
            # Every port of its own: another test file's Ray may be running beside this one (`make
            # test` runs two workers), and a Ray instance's defaults are fixed ports (its dashboard
            # agent's 52365, through which `ray job submit` reaches the job; the client server's 10001).
            port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
            started.append((temp_dir, port))
            start = subprocess.run(
                [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                 f"--object-store-memory={300 * 1024 * 1024}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
                 f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                env=env, capture_output=True, text=True, timeout=180,
            )
            address = f"http://127.0.0.1:{dashboard_port}"
            if start.returncode == 0:
                # The job server answers a little after `ray start` returns.
                deadline = time.time() + 60
                answered, last = False, ""
                while not answered and time.time() < deadline:
                    try:
                        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                               capture_output=True, text=True, timeout=60)
                        answered, last = probe.returncode == 0, probe.stderr[-2000:]
                    except subprocess.TimeoutExpired:  # something else holds the port and never answers
                        last = "`ray job list` timed out"
                    if not answered:
                        time.sleep(2)
                if answered:
                    break
                failures.append(f"the job server at {address} never answered: {last}")
            else:
                failures.append(start.stdout[-2000:] + start.stderr[-4000:])
            # The ports were free when picked, but Ray binds them seconds later, and meanwhile the
            # other pytest worker's processes may take one: start again on new ports.
            stop_ray_started_in(temp_dir, port)
        else:
            pytest.fail("ray start --head failed three times:\n" + "\n---\n".join(failures))
        yield address, env
    finally:
        for temp_dir, port in started:
            stop_ray_started_in(temp_dir, port)
            shutil.rmtree(temp_dir, ignore_errors=True)


def stop_ray_started_in(temp_dir: Path, gcs_port: int) -> None:
    """Stop the Ray instance started with --temp-dir TEMP_DIR and --port GCS_PORT, and only it.
    (`ray stop --force` ends every Ray process on the machine, including the Ray instances of tests
    running beside this one.) Its head processes name the folder on their command lines and its
    client server the GCS address; the agents and dashboard modules they started are their children."""
    import psutil

    def ours(args: list[str]) -> bool:
        return any(str(temp_dir) in arg or (arg.startswith("--address=") and arg.endswith(f":{gcs_port}")) for arg in args)

    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    heads = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in mine and ours(p.info["cmdline"] or [])]
    processes: dict[int, psutil.Process] = {}
    for head in heads:
        with contextlib.suppress(psutil.Error):
            processes.update((p.pid, p) for p in [head, *head.children(recursive=True)])
    for process in processes.values():  # SIGKILL, as `ray stop --force` sends
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(processes.values()), timeout=5)


def test_ray_job_submit_indexes_an_archive(ray_head, tmp_path):
    from facebatch.demo import build_demo_archive

    address, env = ray_head
    names = build_demo_archive(tmp_path)
    out = tmp_path / "tables"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", f"facebatch-test-{os.getpid()}", "--",
         sys.executable, str(REPO / "jobs" / "index_archive.py"), str(tmp_path / "archive"), "--out", str(out),
         "--max-side", "1024", "--batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    con = duckdb.connect()
    rows = dict(con.sql(f"SELECT uri, status FROM read_parquet('{out}/images/*.parquet')").fetchall())
    assert sorted(rows) == sorted(str(tmp_path / "archive" / n) for n in names)
    assert rows[str(tmp_path / "archive" / "portraits" / "astronaut.jpg")] == "ok"
    assert rows[str(tmp_path / "archive" / "broken" / "not_a_photo.jpg")] == "not_image"
    faces = con.sql(f"SELECT count(*) FROM read_parquet('{out}/faces/*.parquet')").fetchone()[0]
    assert faces >= 6  # astronaut, 3 in the group scene, the sideways one, the tilted one

    # The people job on the same index, its kNN graph built by Ray tasks on the cluster.
    people = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", f"facebatch-people-{os.getpid()}", "--",
         sys.executable, str(REPO / "jobs" / "cluster_people.py"), str(out), "--knn", "ray"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert people.returncode == 0, people.stdout[-4000:] + people.stderr[-4000:]
    assert "persons" in people.stdout
    from facebatch.query import connect

    con_people = connect(str(out))
    assert con_people.execute("SELECT count(*) FROM face_people").fetchone()[0] == faces
    # Every copy of the astronaut is one person, except where two copies share a photo.
    assert con_people.execute("SELECT count(*) FROM people").fetchone()[0] >= 1
    record = json.loads(max((out / "_runs").glob("people-*.json")).read_text())
    assert record["knn"] == "ray"

    # A bad argument fails the job fast with a message, and `ray job submit` exits non-zero.
    bad = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--", sys.executable, str(REPO / "jobs" / "index_archive.py"),
         str(tmp_path / "archive"), "--out", str(out), "--device", "tpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0
    assert "device must be one of" in bad.stdout + bad.stderr
