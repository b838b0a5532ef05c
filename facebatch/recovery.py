"""Recovery: finish or discard what interrupted writers left in OUT/_staging.

Every writer (`index`, `compact`, `people`) runs this first, under OUT's lease. For each staging
folder:

- not a run id (not made by facebatch): left alone, never turned into paths;
- its heartbeat is fresh (another writer is in it right now): left alone;
- a compaction or people swap (`compact-*`, `people-*`): finished from its journal when it has
  one (facebatch.swap), else discarded (nothing of it was visible);
- an index run: published with its staged record when it finished writing (READY marker and
  record.json), else discarded (partial).

A failed GET of a marker, record, heartbeat or journal raises StorageError and stops recovery:
only "not found" means absent, so a storage outage never deletes a finished run or a journal.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from . import storage, swap
from .config import ConfigError, check_run_id
from .out import Out, is_live
from .publishing import publish_run


def recover_staging(out: Out) -> list[dict[str, str]]:
    """Finish or discard what crashed runs left in OUT/_staging. Idempotent; returns what it did."""
    actions: list[dict[str, str]] = []
    staging = out.staging_root()
    try:
        entries = out.fs.get_file_info(pafs.FileSelector(staging.fs_path(), allow_not_found=True))
    except FileNotFoundError:
        return actions
    except OSError as exc:
        raise storage.storage_error("LIST", staging.uri(), exc) from exc
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        run_id = entry.base_name
        try:
            check_run_id(run_id)
        except ConfigError:
            # Not made by facebatch (or a hostile name): never turned into paths to publish or delete.
            actions.append({"run_id": run_id, "action": "left alone: not a run id"})
            continue
        if is_live(out, run_id):
            actions.append({"run_id": run_id, "action": "left alone: another run is writing it"})
            continue
        kind = swap.kind_of(run_id)
        if kind is not None:
            finished = swap.finish_swap(out, kind, run_id)
            if not finished:
                out.discard_staged(run_id)
            actions.append({"run_id": run_id, "action": kind.finished_action if finished else kind.discarded_action})
            continue
        ready = out.read_json(out.ready_marker(run_id))
        staged_record = out.read_json(out.staged_record(run_id))
        if ready is not None and staged_record is not None:
            staged_record["recovered"] = True
            publish_run(out, run_id, staged_record)
            actions.append({"run_id": run_id, "action": "published"})
        else:
            out.discard_staged(run_id)
            actions.append({"run_id": run_id, "action": "discarded"})
    return actions
