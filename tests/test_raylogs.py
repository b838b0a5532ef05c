"""The expected Ray messages are dropped, and nothing else is (facebatch/raylogs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import logging, os, sys
from facebatch import raylogs

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
raylogs.quiet_expected_log_messages()
logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
logging.getLogger("ray._private.authentication.authentication_token_setup").warning("Token file unreadable")
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")

f = raylogs.StderrLineFilter()
os.write(2, b"kept 1\n[2026-11-30 06:13:46,870 E 9705 9705] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(FaceModelActor))' and ID: 'c95' has constructor arguments in the object "
            b"store and max_restarts > 0. If the arguments ...\n")
os.write(2, b"kept 2, writ")      # a line in two writes
os.write(2, b"ten in two parts\n")
print("kept 3 from python", file=sys.stderr)
os.write(2, b"[2026-11-30 E 1 1] core_worker.cc: another error\n")
os.write(2, b"no newline at the end")
f.close()
print("dropped", f.dropped)
os.write(2, b"\nafter close: has constructor arguments in the object store and max_restarts > 0\n")
'''


def test_only_the_expected_lines_are_dropped():
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    err = run.stderr.decode()
    assert err.splitlines() == [
        "ray._private.authentication.authentication_token_setup: Token file unreadable",
        "kept 1",
        "kept 2, written in two parts",
        "kept 3 from python",
        "[2026-11-30 E 1 1] core_worker.cc: another error",
        "no newline at the end",
        "after close: has constructor arguments in the object store and max_restarts > 0",
    ]
    assert run.stdout.decode().strip() == "dropped 1"
