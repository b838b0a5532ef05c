"""Entrypoint for `ray job submit`: group an index's faces into persons on the cluster.

    ray job submit --working-dir . -- python jobs/cluster_people.py s3://index/ [--full] [--labels s3://.../labels.csv]

Takes the same options as `facebatch people` (see `python jobs/cluster_people.py --help`); the kNN
graph is built by Ray tasks on the cluster the job runs on (RAY_ADDRESS is set by `ray job submit`).
"""

from __future__ import annotations

import argparse
import logging
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
