"""Writing an index run: the driver streams the run's rows into OUT/_staging/<run_id>/.

One staged Parquet file per table, sorted by image_id, with row-group statistics; a heartbeat
while it writes (so no other run takes the folder for a crash's leftovers); the READY marker once
both files are complete. Nothing here is visible to readers: publishing.py makes it so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .config import check_run_id
from .out import Heartbeat, Out
from .tables import TABLES

@dataclass
class StagedTable:
    name: str
    fs_path: str
    writer: pq.ParquetWriter
    rows: int = 0
    last_id: str | None = None


@dataclass
class RunWriter:
    """Streams a run's rows into one staged Parquet file per table, sorted by image_id.

    Rows must arrive in image_id order (the pipeline preserves the plan's order); this is
    checked, because the row-group statistics that make lookups cheap rely on it.
    """

    out: Out
    run_id: str
    row_group_size: int = 50_000
    staged: dict[str, StagedTable] = field(default_factory=dict)
    _buffers: dict[str, list[pa.Table]] = field(default_factory=dict)
    _buffered_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        # The heartbeat comes first: a staging folder without one looks abandoned to other runs.
        self.heartbeat = Heartbeat.start(self.out, self.run_id)
        try:
            self._open_writers()
        except BaseException:
            self.heartbeat.stop()  # what was staged is left for recovery to discard
            raise

    def _open_writers(self) -> None:
        for name, schema in TABLES.items():
            path = self.out.staged_table(self.run_id, name).fs_path()
            self.out.ensure_parent_dir(path)
            writer = pq.ParquetWriter(
                path,
                schema,
                filesystem=self.out.fs,
                compression="zstd",
                write_statistics=True,
                # Embeddings are incompressible floats; dictionary pages would only cost time.
                use_dictionary=["uri", "status", "format", "pipeline_version", "run_id", "error"]
                if name == "images"
                else ["pipeline_version", "run_id"],
            )
            self.staged[name] = StagedTable(name, path, writer)
            self._buffers[name] = []
            self._buffered_rows[name] = 0

    def write(self, name: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(TABLES[name].names).cast(TABLES[name])
        ids = table.column("image_id").to_pylist()
        staged = self.staged[name]
        first = ids[0]
        if staged.last_id is not None and first < staged.last_id:
            raise RuntimeError(f"{name} rows arrived out of image_id order ({first!r} after {staged.last_id!r})")
        staged.last_id = ids[-1]
        self._buffers[name].append(table)
        self._buffered_rows[name] += table.num_rows
        if self._buffered_rows[name] >= self.row_group_size:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if not self._buffers[name]:
            return
        table = pa.concat_tables(self._buffers[name])
        self.staged[name].writer.write_table(table, row_group_size=self.row_group_size)
        self.staged[name].rows += table.num_rows
        self._buffers[name] = []
        self._buffered_rows[name] = 0

    def close(self) -> dict[str, int]:
        for name in self.staged:
            self._flush(name)
            self.staged[name].writer.close()
        # The READY marker says both staged files are complete: a crash after this point is
        # finished by the next run's recovery instead of discarded.
        ready = self.out.ready_marker(self.run_id).fs_path()
        with self.out.fs.open_output_stream(ready) as fh:
            fh.write(json.dumps({name: s.rows for name, s in self.staged.items()}).encode())
        return {name: s.rows for name, s in self.staged.items()}

    def abort(self) -> None:
        """Give up this run: stop beating and delete what it staged (nothing of it was visible)."""
        for staged in self.staged.values():
            try:
                staged.writer.close()
            except OSError:
                pass  # the folder is deleted below; recovery discards it should that fail too
        self.heartbeat.stop()
        self.out.delete_tree(self.out.staging(self.run_id))


