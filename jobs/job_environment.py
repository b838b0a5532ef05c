"""What both job entrypoints check first: that this Python can run facebatch at all.

Stdlib only: it runs before facebatch (or anything it needs) is known to import.
"""

from __future__ import annotations

import sys


def check_environment(prog: str) -> str | None:
    """None when facebatch and its main dependencies import in this Python; else what to do.

    `ray job submit -- python jobs/...` runs the entrypoint with the `python` of the Ray head's
    environment (its PATH), not the submitter's: a head started outside facebatch's environment
    (e.g. `.venv/bin/ray start --head` without activating the venv) has no pyarrow or torch."""
    for module in ("pyarrow", "torch", "facebatch"):
        try:
            __import__(module)
        except ImportError as exc:
            return (
                f"{prog}: this Python ({sys.executable}) cannot import {module!r} ({exc}). The job's entrypoint runs "
                "with the Python of the Ray head's environment, not the submitter's: start the Ray head from the "
                "environment where facebatch is installed (activate it first, e.g. `source .venv/bin/activate && "
                "ray start --head`), or name that environment's python in the entrypoint "
                "(`-- /path/to/.venv/bin/python jobs/...`)."
            )
    return None
