"""One writer per OUT: the lease on local disk and on S3 (moto_server, conditional PUTs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from facebatch import lease as lease_mod
from facebatch.lease import Lease, LeaseHeld, LeaseLost


def _outs(tmp_path, s3_server):
    client = s3_server.client()
    bucket = "lease-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    return [str(tmp_path / "out"), f"s3://{bucket}/index"]


def _write_lease(out: str, s3_server, payload: dict) -> None:
    if out.startswith("s3://"):
        bucket, prefix = out[5:].split("/", 1)
        s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/_lease.json", Body=json.dumps(payload).encode())
    else:
        _write_local(out, json.dumps(payload).encode())


def _write_local(out: str, body: bytes) -> None:
    """As another facebatch writer takes a lease over: under the flock of OUT/_lease.lock (so not
    between a renewal's read and its write) and whole, with os.replace."""
    import fcntl
    import os

    os.makedirs(out, exist_ok=True)
    fd = os.open(f"{out}/_lease.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(f"{out}/_lease.json.tmp", "wb") as fh:
            fh.write(body)
        os.replace(f"{out}/_lease.json.tmp", f"{out}/_lease.json")
    finally:
        os.close(fd)


def _write_raw(out: str, s3_server, body: bytes) -> None:
    if out.startswith("s3://"):
        bucket, prefix = out[5:].split("/", 1)
        s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/_lease.json", Body=body)
    else:
        _write_local(out, body)


def _read_raw(out: str, s3_server) -> bytes:
    if out.startswith("s3://"):
        bucket, prefix = out[5:].split("/", 1)
        return s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/_lease.json")["Body"].read()
    with open(f"{out}/_lease.json", "rb") as fh:
        return fh.read()


def _wait_until_lost(held: Lease, seconds: float = 15) -> LeaseLost:
    # Polled: with the CPU shared, as under `make test`'s two workers, a renewal can come late.
    deadline = time.monotonic() + seconds
    while True:
        try:
            held.check()
        except LeaseLost as exc:
            return exc
        assert time.monotonic() < deadline, "the holder never learnt that its lease was taken"
        time.sleep(0.1)


def test_second_writer_is_refused_then_admitted_after_release(tmp_path, s3_server):
    for out in _outs(tmp_path, s3_server):
        with Lease(out, holder="facebatch index run r1") as first:
            with pytest.raises(LeaseHeld, match=r"being written by another facebatch job: facebatch index run r1 on host .* since \d{4}-"):
                Lease(out, holder="facebatch compact c1").acquire()
            first.check()
        with Lease(out, holder="facebatch compact c1") as second:
            assert second.took_over is None


def test_stale_leases_are_taken_over(tmp_path, s3_server):
    for out in _outs(tmp_path, s3_server):
        # Expired, on another machine.
        _write_lease(out, s3_server, {"holder": "old", "host": "elsewhere", "pid": 1, "token": "t",
                                      "since": time.time() - 900, "expires": time.time() - 1})
        with Lease(out, holder="new") as taken:
            assert taken.took_over["holder"] == "old"
        # Not expired, on another machine: held.
        _write_lease(out, s3_server, {"holder": "live", "host": "elsewhere", "pid": 1, "token": "t",
                                      "since": time.time(), "expires": time.time() + 300})
        with pytest.raises(LeaseHeld, match="live on host elsewhere"):
            Lease(out, holder="new").acquire()
        # Not expired, but its process on this machine is dead (a SIGKILLed driver).
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        import socket

        _write_lease(out, s3_server, {"holder": "killed", "host": socket.gethostname(), "pid": dead.pid, "token": "t",
                                      "since": time.time(), "expires": time.time() + 300})
        with Lease(out, holder="new") as taken:
            assert taken.took_over["holder"] == "killed"


def test_renewal_and_losing_the_lease(tmp_path, s3_server):
    for out in _outs(tmp_path, s3_server):
        held = Lease(out, holder="slow", ttl=60, renew_every=0.2).acquire()
        try:
            time.sleep(0.6)
            held.check()  # renewed meanwhile
            # Someone takes it over (as if it had expired): the holder learns it at its next renewal.
            _write_lease(out, s3_server, {"holder": "thief", "host": "elsewhere", "pid": 1, "token": "x",
                                          "since": time.time(), "expires": time.time() + 300})
            assert "thief" in str(_wait_until_lost(held))
        finally:
            held.release()  # never deletes the other writer's lease
        with pytest.raises(LeaseHeld, match="thief"):
            Lease(out, holder="third").acquire()


@pytest.mark.parametrize("body", [b"", b"{\"holder\": \"tor", b"[1, 2]", b"<Error>not json</Error>",
                                  b'{"holder": "h", "token": "t", "since": "yesterday", "expires": 1e12}'],
                         ids=["empty", "torn", "a-list", "xml", "a-string-date"])
def test_a_lease_object_that_is_not_a_lease_record_is_nobodys(tmp_path, s3_server, body):
    for out in _outs(tmp_path, s3_server):
        # Replaced under a holder: the holder stops (it can no longer tell that OUT is its own)...
        held = Lease(out, holder="slow", ttl=60, renew_every=0.2).acquire()
        try:
            _write_raw(out, s3_server, body)
            assert "is not a facebatch lease record" in str(_wait_until_lost(held))
        finally:
            held.release()
        assert _read_raw(out, s3_server) == body, "release deleted a lease object that was not its own"
        # ... and a new writer is refused with what to do, not a traceback.
        with pytest.raises(LeaseHeld, match=r"_lease.json is not a facebatch lease record .*delete .*_lease.json and run again"):
            Lease(out, holder="new").acquire()
        assert lease_mod._ACTIVE_TOKENS == set()


def test_index_and_compact_exit_2_while_another_writer_holds_out(tmp_path, capsys):
    from facebatch.cli import main

    out = tmp_path / "out"
    (out / "_runs").mkdir(parents=True)
    (out / "_runs" / "r.json").write_text("{}")
    (tmp_path / "src").mkdir()
    with Lease(str(out), holder="facebatch index run other"):
        for argv in (["index", str(tmp_path / "src"), "--out", str(out)], ["compact", str(out)]):
            assert main(argv) == 2
            assert "being written by another facebatch job: facebatch index run other" in capsys.readouterr().err
    assert lease_mod._ACTIVE_TOKENS == set()
