"""The job entrypoints say clearly when the Ray head's Python is not facebatch's environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, argv", [("index_archive.py", ["s3://a/photos", "--out", "s3://b/index"]),
                                          ("cluster_people.py", ["s3://b/index"])])
def test_entrypoint_without_facebatchs_dependencies_exits_2_with_advice(tmp_path, script, argv):
    # -S: no site-packages, like a head started outside the environment where facebatch is installed.
    done = subprocess.run([sys.executable, "-S", str(REPO / "jobs" / script), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{script}: this Python" in done.stderr and "cannot import 'pyarrow'" in done.stderr
    assert "Ray head" in done.stderr and "Traceback" not in done.stderr
