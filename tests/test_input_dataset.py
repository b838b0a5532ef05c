"""The run's input dataset: one block per inference batch, in plan order, whichever way Ray
Data gets the blocks' metadata (computed in the driver for small plans, by remote tasks above
LOCAL_BLOCKS_MAX blocks)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facebatch import pipeline
from facebatch.plan import Plan


@pytest.fixture
def plan(tmp_path):
    ids = [f"{i:040x}" for i in range(37)]
    todo = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image_id": ids, "uri": [f"s3://b/photo{i}.jpg" for i in range(37)],
                             "size": list(range(37))}), todo)
    return Plan(spill_dir=str(tmp_path), todo_path=str(todo))


@pytest.mark.parametrize("local_blocks_max", [pipeline.LOCAL_BLOCKS_MAX, 0])
def test_one_block_per_batch_in_plan_order(ray_local, plan, monkeypatch, local_blocks_max):
    monkeypatch.setattr(pipeline, "LOCAL_BLOCKS_MAX", local_blocks_max)
    ds = pipeline.input_dataset(plan, rows=8, first_rows=2)
    # 2, then 6 (the rest of the first batch), then 8, 8, 8 and 5.
    assert ds.num_blocks() == 6
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert [b.num_rows for b in blocks] == [2, 6, 8, 8, 8, 5]
    assert pa.concat_tables(blocks).column("image_id").to_pylist() == [f"{i:040x}" for i in range(37)]
