"""A real S3 server (moto_server) on loopback, for tests and benchmarks.

boto3, pyarrow and DuckDB reach it over HTTP exactly as they reach AWS; nothing is patched.
"""

from __future__ import annotations

import os
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listens_on(process, port: int) -> bool:
    """Does this process (a Popen) itself listen on 127.0.0.1:port? A probe that only connects can
    be answered by whatever else took the port before the server bound it."""
    import psutil

    try:
        proc = psutil.Process(process.pid)
        connections = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def start_on_a_free_port(command, log_path: Path, probe, what: str):
    """Start `command(port)` on a free loopback port, logging to log_path; (port, process, log
    file) once `probe(port)` stops raising and the process itself listens on the port.

    The port is free when picked but bound only once the server has started, seconds later;
    meanwhile another process (a test file in the other pytest worker, its Ray) may take it. The
    server then exits at once, and a new port is tried, three times at most. A probe alone could be
    answered by the port's taker, hence the check of who listens."""
    import subprocess
    import time

    for _attempt in range(3):
        port = free_port()
        log = open(log_path, "wb")
        process = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                probe(port)
                if listens_on(process, port):
                    return port, process, log
            except Exception:  # not up yet (refused, reset, timed out, an HTTP error)
                pass
            if process.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.2)
        stop_process(process, log)
    raise RuntimeError(f"{what} did not start: {log_path.read_text()[-2000:]}")


def stop_process(process, log) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except Exception:
        process.kill()
    log.close()


class S3Server:
    """A moto_server process on 127.0.0.1, reached over HTTP by boto3/pyarrow/DuckDB like AWS."""

    def __init__(self, tmp_dir: Path):
        import sys
        import urllib.request

        moto = Path(sys.executable).with_name("moto_server")
        self.log_path = tmp_dir / "moto_server.log"
        self.port, self.process, self._log = start_on_a_free_port(
            lambda port: [str(moto), "-H", "127.0.0.1", "-p", str(port)], self.log_path,
            lambda port: urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1),
            "moto_server")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        stop_process(self.process, self._log)
