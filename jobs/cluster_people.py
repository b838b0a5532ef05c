"""Entrypoint for `ray job submit`: group an index's faces into persons on the cluster.

    ray job submit --working-dir . -- python jobs/cluster_people.py s3://index/ [--full] [--labels s3://.../labels.csv]

Takes the same options as `facebatch people` (see `python jobs/cluster_people.py --help`); the kNN
graph is built by Ray tasks on the cluster the job runs on (RAY_ADDRESS is set by `ray job submit`).
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
    """The entrypoint's argument parser (the options of `facebatch people`)."""
    from facebatch.cli import add_people_options

    parser = argparse.ArgumentParser(prog="cluster_people.py", description=__doc__.split("\n\n")[0])
    add_people_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    problem = check_environment("cluster_people.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from facebatch.cli import people_config_from_args
    from facebatch.summaries import format_people_summary
    from facebatch.config import ConfigError
    from facebatch.people import run_people
    from facebatch.storage import StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = people_config_from_args(args)
        summary = run_people(config, ray_address=args.ray_address)
    except ConfigError as exc:
        print(f"cluster_people.py: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # names the object; the previous people tables stay current
        print(f"cluster_people.py: {exc}", file=sys.stderr)
        return 1
    print(format_people_summary(summary.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
