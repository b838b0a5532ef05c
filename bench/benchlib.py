"""What every benchmark shares: where the repository and the shared corpus are, the argument
parser, and a loopback S3 server for runs from and to `s3://`.

A script in bench/ starts with `from benchlib import REPO, SHARED, ...` (Python puts the script's
own folder first on sys.path); importing benchlib also puts the repository (facebatch, without an
install) and tests/ (helpers shared with the tests, such as the S3 server) on sys.path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
# The shared test corpus (faces/, reference/); FACEBATCH_SHARED_DATA points elsewhere, like the tests.
SHARED = Path(os.environ.get("FACEBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))

for _path in (REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def parser(doc: str | None, whole_doc: bool = False, **kwargs) -> argparse.ArgumentParser:
    """A benchmark's argument parser, described by the first paragraph of its docstring (or all
    of it, as written, with whole_doc)."""
    doc = doc or ""
    if whole_doc:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return argparse.ArgumentParser(description=doc, **kwargs)
    return argparse.ArgumentParser(description=doc.split("\n\n")[0].strip(), **kwargs)


@contextlib.contextmanager
def s3_server(work: Path, *buckets: str) -> Iterator:
    """A moto_server on loopback (tests/s3server.py) for the block: the environment points boto3,
    pyarrow, DuckDB and Ray workers started meanwhile at it; the named buckets exist. Its pid is
    `server.process.pid` (to leave it out of memory figures: it keeps every object in RAM)."""
    from s3server import S3Server

    server = S3Server(work)
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        client = server.client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
