"""What a user gets wrong (or an attacker tries) ends in a one-line message and the right exit code,
before anything is read or written: run ids that would leave OUT, unsupported schemes, `compact` on
a folder without an index, a manifest on S3 naming local files; and `detect` fails when nothing
could be read. Error rows never quote the bytes of the file they are about."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from facebatch.config import ConfigError, IndexConfig
from facebatch.pipeline import MIN_FAILED_FOR_RUN_FAILURE, too_many_fetch_failures

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "facebatch.cli", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("run_id", ["../../escaped", "..", "a/b", "a..b", ".hidden", "-x", "", "x" * 129, "ü"])
def test_run_ids_that_could_leave_out_are_refused(run_id):
    with pytest.raises(ConfigError, match="run id"):
        IndexConfig(source="/src", out="/out", run_id=run_id).validate()


@pytest.mark.parametrize("run_id", ["20260101T000000Z-abcd1234", "nightly_2026-01-01", "v1.2", "x" * 128])
def test_ordinary_run_ids_are_accepted(run_id):
    IndexConfig(source="/src", out="/out", run_id=run_id).validate()


def test_escaping_run_id_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    run = cli("index", str(tmp_path / "src"), "--out", str(tmp_path / "a" / "out"), "--run-id", "../../escaped")
    assert run.returncode == 2, run.stderr
    assert "run id '../../escaped' is not allowed" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("args, message", [
    (["index", "gs://bucket/x", "--out", "{tmp}/out"], "unsupported URI scheme 'gs'"),
    (["index", "{tmp}", "--out", "gs://bucket/out"], "unsupported URI scheme 'gs'"),
    (["index", "{tmp}", "--out", "{tmp}/out", "--max-error-rate", "1.5"], "max_error_rate must be a fraction between 0 and 1"),
    (["compact", "{tmp}/nothing-here"], "holds no facebatch index"),
    (["compact", "{tmp}"], "holds no facebatch index"),
    (["compact", "gs://bucket/out"], "unsupported URI scheme 'gs'"),
    (["index", "{tmp}", "--out", "{tmp}/out", "--device", "cuda:1"], "Ray assigns each inference actor its own GPU"),
    (["index", "{tmp}", "--out", "{tmp}/out", "--num-actors", "3", "--max-actors", "2"], "is below --num-actors 3"),
])
def test_input_errors_exit_2_with_a_message(tmp_path, args, message):
    run = cli(*[a.format(tmp=tmp_path) for a in args])
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created (compact made no staging folder)


def test_manifest_on_s3_may_not_name_local_files(s3_server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is hunter2\n")
    client = s3_server.client()
    client.create_bucket(Bucket="manifests")
    client.put_object(Bucket="manifests", Key="m/list.csv",
                      Body=f"uri\ns3://manifests/photos/a.jpg\n{secret}\nrelative/b.jpg\n".encode())
    run = cli("index", "s3://manifests/m/list.csv", "--out", str(tmp_path / "out"), env=s3_server.env())
    assert run.returncode == 2, run.stderr[-3000:]
    # The manifest is streamed: the message names the first offenders it met, both of them here.
    assert "names local or relative path(s)" in run.stderr and str(secret) in run.stderr and "relative/b.jpg" in run.stderr
    assert "hunter2" not in run.stdout + run.stderr
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "_staging").exists()


def test_detect_fails_when_no_input_could_be_read(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("the password is hunter2\n")
    run = cli("detect", str(text), str(tmp_path / "missing.jpg"))
    assert run.returncode == 1, run.stderr[-2000:]
    assert "none of the 2 input(s) could be read as an image" in run.stderr
    assert len(run.stdout.splitlines()) == 2  # one answer per file still
    assert "hunter2" not in run.stdout  # the error says what kind of file it is, not what it holds


def test_non_image_messages_never_quote_the_file():
    from facebatch.decode import DecodeError, decode_image

    for data in (b"user=admin\npassword=hunter2\n", b"\x01\x02hunter2\x00\x00" * 20, b"P1\n4 4\nhunter2 9 9 9\n"):
        with pytest.raises(DecodeError) as caught:
            decode_image(data)
        assert "hunter2" not in caught.value.message and "68756e74" not in caught.value.message, caught.value.message


def test_failed_planning_removes_its_spill_folder(tmp_path, monkeypatch):
    from facebatch.plan import build_plan

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dup = tmp_path / "dup.csv"
    dup.write_text("uri,image_id\na.jpg,x\nb.jpg,x\n")
    with pytest.raises(ConfigError, match="2 times"):
        build_plan(IndexConfig(source=str(dup), out=str(tmp_path / "out")).validate(), "v")
    assert not list(tmp_path.glob("facebatch-plan-*"))


@pytest.mark.parametrize("failed, total, fails", [
    (0, 0, False), (3, 3, True), (2, 3, False), (1, 1, True),
    (MIN_FAILED_FOR_RUN_FAILURE - 1, MIN_FAILED_FOR_RUN_FAILURE + 5, False),  # a few bad objects
    (MIN_FAILED_FOR_RUN_FAILURE, MIN_FAILED_FOR_RUN_FAILURE + 5, True),
    (500, 1000, False), (501, 1000, True),
])
def test_systemic_fetch_failure_rule(failed, total, fails):
    assert too_many_fetch_failures(failed, total, 0.5) is fails


def test_max_error_rate_bounds():
    assert too_many_fetch_failures(1000, 1000, 1.0) is False  # 1.0: never fail the run
    assert too_many_fetch_failures(20, 1000, 0.0) is True
    for bad in (-0.1, 1.01, True):
        with pytest.raises(ConfigError, match="max_error_rate"):
            IndexConfig(source="/s", out="/o", max_error_rate=bad).validate()
