"""Shared fixtures. Tests that need the shared corpus skip cleanly when it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FACEBATCH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require_shared() -> Path:
    if not (SHARED_DATA / "faces" / "MANIFEST.json").is_file():
        pytest.skip(f"shared test corpus not found at {SHARED_DATA} (set FACEBATCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data (faces/, reference/); skips the test when absent."""
    return _require_shared()


@pytest.fixture(scope="session")
def shared_manifest(shared_data) -> dict:
    return json.loads((shared_data / "faces" / "MANIFEST.json").read_text())


@pytest.fixture(scope="session")
def astronaut_rgb():
    """Public-domain NASA portrait bundled inside scikit-image's wheel (no download)."""
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8 RGB


# --------------------------------------------------------------------------- a real S3 server on loopback


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """A moto_server process on 127.0.0.1, reached over HTTP by boto3/pyarrow/DuckDB like AWS."""

    def __init__(self, tmp_dir: Path):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        self.log_path = tmp_dir / "moto_server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                break
            except Exception:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.2)

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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the in-process pipeline tests, with a small object store."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
