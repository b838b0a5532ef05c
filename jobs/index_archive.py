"""Entrypoint for `ray job submit`: index an archive into Parquet tables on the cluster.

    ray job submit --working-dir . -- python jobs/index_archive.py s3://photos/ --out s3://index/

Takes the same options as `facebatch index` (see `python jobs/index_archive.py --help`); connects
to the cluster the job runs on (RAY_ADDRESS is set by `ray job submit`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# The shared environment check sits beside this script; its folder is on sys.path when the script
# is run (`python jobs/...`), not when a test loads it by its path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_environment import check_environment  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The entrypoint's argument parser (the options of `facebatch index`); light to import, no torch or Ray."""
    from facebatch.cli import add_index_options

    parser = argparse.ArgumentParser(prog="index_archive.py", description=__doc__.split("\n\n")[0])
    add_index_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    problem = check_environment("index_archive.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from facebatch.cli import config_from_args
    from facebatch.summaries import format_summary
    from facebatch.config import ConfigError
    from facebatch.pipeline import RunFailed, run_index
    from facebatch.storage import StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        summary = run_index(config, ray_address=args.ray_address, object_store_memory=args.object_store_memory)
    except ConfigError as exc:  # also what planning finds wrong with SOURCE (e.g. a manifest's uris)
        print(f"index_archive.py: {exc}", file=sys.stderr)
        return 2
    except (RunFailed, StorageError) as exc:  # the message says what failed; staged state is kept or removed
        print(f"index_archive.py: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
