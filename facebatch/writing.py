"""Writing an index run: the driver streams the run's rows into OUT/_staging/<run_id>/.

One staged Parquet file per table, sorted by image_id, with row-group statistics; a heartbeat
while it writes (so no other run takes the folder for a crash's leftovers); the READY marker once
both files are complete. Nothing here is visible to readers: publishing.py makes it so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import check_run_id
from .out import Heartbeat, Out
from .tables import EMBEDDING_DIM, FACE_STRUCT, IMAGES_SCHEMA, PRUNED_IDS_SCHEMA, REPLACED_IDS_SCHEMA, TABLES


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
    # "open" while rows stream in; "complete" once READY is written; "aborted" after abort().
    state: str = field(default="open", init=False)

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
        self.state = "complete"
        return {name: s.rows for name, s in self.staged.items()}

    def abort(self) -> None:
        """Give up this run: stop beating, delete what it staged (nothing of it was visible) and
        abort the uploads left open."""
        self.state = "aborted"
        for staged in self.staged.values():
            try:
                staged.writer.close()
            except OSError:
                pass  # the folder is deleted below; recovery discards it should that fail too
        self.heartbeat.stop()
        self.out.discard_staged(self.run_id)


# ------------------------------------------------------------------ inference output -> table rows


def faces_array(results: list, n_rows: int, ok_idx: np.ndarray, embed: bool) -> pa.Array:
    """One list<struct> entry per row of the batch (empty list for rows that are not ok)."""
    per_row = [None] * n_rows
    for i, res in zip(ok_idx, results):
        per_row[i] = res
    counts = np.array([0 if r is None else len(r) for r in per_row], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    present = [r for r in per_row if r is not None and len(r)]
    total = int(counts.sum())

    def cat(attr: str, shape: tuple) -> np.ndarray:
        if not present:
            return np.zeros((0, *shape), np.float32)
        return np.concatenate([np.asarray(getattr(r, attr), np.float32).reshape(-1, *shape) for r in present])

    def fixed(values: np.ndarray, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), width)

    face_index = np.concatenate([np.arange(len(r), dtype=np.int32) for r in present]) if present else np.zeros(0, np.int32)
    if embed:
        embedding = fixed(cat("embeddings", (EMBEDDING_DIM,)), EMBEDDING_DIM)
    else:
        embedding = pa.nulls(total, pa.list_(pa.float32(), EMBEDDING_DIM))
    struct = pa.StructArray.from_arrays(
        [
            pa.array(face_index, pa.int32()),
            fixed(cat("boxes", (4,)), 4),
            pa.array(cat("scores", ()), pa.float32()),
            fixed(cat("landmarks", (5, 2)), 10),
            embedding,
            pa.array(cat("face_size", ()), pa.float32()),
            pa.array(cat("roll", ()), pa.float32()),
            pa.array(cat("yaw", ()), pa.float32()),
            pa.array(cat("sharpness", ()), pa.float32()),
        ],
        fields=list(FACE_STRUCT),
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct)


def split_output(batch: pa.Table, version: str, run_id: str, indexed_at: datetime) -> tuple[pa.Table, pa.Table]:
    """The actor's per-image rows -> (images rows, faces rows) in the table contract."""
    n = batch.num_rows
    images = pa.table(
        {
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "etag": batch["etag"],
            "size_bytes": batch["size_bytes"],
            "width": batch["width"],
            "height": batch["height"],
            "format": batch["format"],
            "status": batch["status"],
            "error": batch["error"],
            "num_faces": batch["num_faces"],
            "pipeline_version": pa.array([version] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "indexed_at": pa.array([indexed_at] * n, IMAGES_SCHEMA.field("indexed_at").type),
        }
    )
    faces_col = batch["faces"].combine_chunks()
    parents = pc.list_parent_indices(faces_col)
    flat = pc.list_flatten(faces_col)
    m = len(flat)
    columns = {"image_id": pc.take(batch["image_id"], parents)}
    for name in FACE_STRUCT.names:
        columns[name] = flat.field(name)
    columns["pipeline_version"] = pa.array([version] * m, pa.string())
    columns["run_id"] = pa.array([run_id] * m, pa.string())
    faces = pa.table(columns)
    return images, faces


# ------------------------------------------------------------------ what the publish removes


def stage_replaced_ids(plan, version: str, out: Out, run_id: str) -> None:
    """Stream the ids of the planned objects that already have a row (changed, retry, or anything
    but new under --full) to OUT/_staging/<run>/replaced.parquet, for publishing.remove_superseded."""
    location = out.replaced_ids(run_id)
    with pq.ParquetWriter(location.fs_path(), REPLACED_IDS_SCHEMA, filesystem=out.fs) as writer:
        for batch in plan.batches(rows=100_000):
            ids = batch.column("image_id").filter(pc.not_equal(batch.column("change"), "new"))
            if len(ids):
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [ids, pa.array([version] * len(ids), pa.string())], schema=REPLACED_IDS_SCHEMA))


def stage_pruned_ids(deleted_ids_path: str, out: Out, run_id: str) -> None:
    """With --prune: the ids of the objects gone from SOURCE (the plan's spill file) to
    OUT/_staging/<run>/prune.parquet, for publishing.remove_superseded."""
    with pq.ParquetWriter(out.pruned_ids(run_id).fs_path(), PRUNED_IDS_SCHEMA,
                          filesystem=out.fs) as prune:
        for batch in pq.ParquetFile(deleted_ids_path, pre_buffer=False).iter_batches(columns=["image_id"]):
            prune.write_batch(batch)
