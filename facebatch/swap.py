"""The journaled swap: replace a set of published files by staged ones, crash-safely.

Compaction (merged files in, per-run files out) and the people job (a new generation in, the
previous one out, and a pointer saying which is current) change OUT the same way:

1. the new files are written under OUT/_staging/<id>/ (invisible to *.parquet globs and to the
   people pointer);
2. the journal, OUT/_staging/<id>/<kind's journal name>, lists them (`add`: staged -> final) and
   the files they replace (`remove`), and for the people job the pointer to write and the run
   record; writing it is the point of no return;
3. `finish_swap`: every staged file is moved into place (one atomic step each); only when every
   one is there, the pointer (if any) is written, the replaced files are deleted, the run record
   (if any) is written and the staging folder goes.

`finish_swap` is idempotent (a moved file is skipped, a deleted one is fine), so a crash or a
storage error at any step leaves the journal, and the next `index`, `compact` or `people` run
(recovery) calls it again and ends where an uninterrupted swap would have. A staging folder
without a journal is discarded by recovery: nothing of it was visible.

Everything a swap needs is in its journal, so recovery finishes one without importing the job
that wrote it (no import cycle between recovery, compaction and people).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from . import storage
from .out import Heartbeat, Out, fault_point


@dataclass(frozen=True)
class SwapKind:
    """What tells one job's swaps apart: names on disk and in messages (the protocol is the same)."""

    name: str  # in fault points: f"{name}-after-move", f"{name}-after-pointer"
    prefix: str  # its staging folders are OUT/_staging/<prefix>...
    journal: str  # the journal's file name in the staging folder
    describe: str  # how messages name one swap, formatted with its id
    missing_message: str  # when a moved file is not in place: formatted with describe and files
    # Compaction tries every delete before failing (fewer duplicates visible until the next run);
    # the people job stops at the first failed delete (the old generation is unreferenced already).
    delete_all_then_fail: bool
    finished_action: str  # what recovery reports
    discarded_action: str


COMPACTION = SwapKind(
    name="compact",
    prefix="compact-",
    journal="compact.json",
    describe="compaction {id}",
    missing_message="{describe}: merged files missing ({files}); old files kept",
    delete_all_then_fail=True,
    finished_action="finished compaction",
    discarded_action="discarded compaction",
)

PEOPLE = SwapKind(
    name="people",
    prefix="people-",
    journal="people.json",
    describe="people run {id}",
    missing_message="{describe}: files missing after the move ({files}); the pointer was not changed",
    delete_all_then_fail=False,
    finished_action="finished people run",
    discarded_action="discarded people run",
)

KINDS = (PEOPLE, COMPACTION)


def kind_of(staging_id: str) -> SwapKind | None:
    """The swap kind a staging folder belongs to (by its name), or None for an index run."""
    for kind in KINDS:
        if staging_id.startswith(kind.prefix):
            return kind
    return None


def journal_location(out: Out, kind: SwapKind, staging_id: str) -> storage.Location:
    return out.staging(staging_id, kind.journal)


def write_journal(out: Out, kind: SwapKind, staging_id: str, journal: dict[str, Any]) -> None:
    """The point of no return: from here on the swap is finished, by this run or the next."""
    out.write_json(journal_location(out, kind, staging_id), journal)


def finish_swap(out: Out, kind: SwapKind, staging_id: str, heartbeat: Heartbeat | None = None) -> bool:
    """Complete a journaled swap (idempotent). False when there is no journal (nothing to finish).

    The swap's heartbeat (when given) stops just before its staging folder is deleted."""
    journal = out.read_json(journal_location(out, kind, staging_id))
    if journal is None:
        return False
    describe = kind.describe.format(id=staging_id)
    for item in journal["add"]:
        out.move(out.at_fs_path(item["staged"]), out.at_fs_path(item["final"]))
        fault_point(f"{kind.name}-after-move")
    missing = [item["final"] for item in journal["add"] if out.file_type(item["final"]) != pafs.FileType.File]
    if missing:
        # Never change the pointer nor remove the old files unless every new file is in place.
        raise RuntimeError(kind.missing_message.format(describe=describe, files=", ".join(missing[:3])))
    if "pointer" in journal:
        # The people job's commit: one small object says which files are current.
        out.write_json(out.people_pointer(journal["version"]), journal["pointer"])
        fault_point(f"{kind.name}-after-pointer")
    _remove_replaced(out, kind, describe, journal["remove"])
    if "record" in journal:
        record = dict(journal["record"], state="published", published_at=time.time())
        out.write_json(out.run_record(staging_id), record)
    if heartbeat is not None:
        heartbeat.stop()
    out.delete_tree(out.staging(staging_id))
    return True


def _remove_replaced(out: Out, kind: SwapKind, describe: str, paths: list[str]) -> None:
    if not kind.delete_all_then_fail:
        for path in paths:
            out.delete_file(path)  # gone already: an earlier attempt
        return
    failed = []
    for path in paths:
        try:
            out.delete_file(path)
        except storage.StorageError as exc:
            failed.append(exc)  # try the others too: fewer duplicates visible until the next attempt
    if failed:
        # The journal stays: the next run finishes the removal. Until then a reader may see these
        # old files beside the new ones (readers through facebatch.query hide them by the journal).
        raise storage.StorageError(
            f"{describe}: {len(failed)} old file(s) could not be deleted, the journal is kept "
            f"for the next run to finish: {failed[0]}"
        )
