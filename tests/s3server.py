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


class S3Server:
    """A moto_server process on 127.0.0.1, reached over HTTP by boto3/pyarrow/DuckDB like AWS."""

    def __init__(self, tmp_dir: Path):
        import subprocess
        import sys
        import time
        import urllib.request

        moto = Path(sys.executable).with_name("moto_server")
        self.log_path = tmp_dir / "moto_server.log"
        # The port is free when picked but bound only once moto_server has started, seconds later;
        # meanwhile another process (a test file in the other pytest worker, its Ray) may take it.
        # moto_server then exits at once, and a new port is tried.
        for attempt in range(3):
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self._log = open(self.log_path, "wb")
            self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log,
                                            stderr=subprocess.STDOUT)
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                    if listens_on(self.process, self.port):  # answered by our moto_server, not the port's taker
                        return
                except Exception:
                    pass
                if self.process.poll() is not None or time.time() > deadline:
                    break
                time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"moto_server did not start: {self.log_path.read_text()[-2000:]}")

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
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
        self._log.close()
