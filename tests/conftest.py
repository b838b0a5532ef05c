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
