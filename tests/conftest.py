"""Shared fixtures. Tests that need the shared corpus skip cleanly when it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FACEBATCH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _ensure_ray_auth_token() -> None:
    """Create ~/.ray/auth_token, whole and once, before any test starts Ray.

    Every local Ray (ray.init, `ray start`, the CLI's runs) uses token authentication and, where
    the file is missing, writes a new token into it with a plain open("w"). `make test` runs two
    pytest workers; on a fresh machine two Rays starting at once could each write their own
    token, or read the other's half-written file, and a cluster's processes would then disagree
    on the token. So the file is made here first, atomically: written under a temporary name and
    hard-linked into place, which fails if another worker got there first (its token is kept)."""
    import secrets

    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"auth_token.{os.getpid()}.tmp")
    tmp.write_text(secrets.token_hex(32))  # what Ray itself generates
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


_ensure_ray_auth_token()


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3server import S3Server

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
