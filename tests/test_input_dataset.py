"""The run's input dataset: one block per inference batch, in plan order, whichever way Ray
Data gets the blocks' metadata (computed in the driver for small plans, by remote tasks above
LOCAL_BLOCKS_MAX blocks)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facebatch import pipeline
from facebatch.plan import Plan


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module only. Not the session-wide ray_local: a Ray instance
    left running in the pytest process dies with it when a later test's `ray stop --force`
    (tests/test_job_submit.py) stops every Ray process on the machine."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def plan(tmp_path):
    ids = [f"{i:040x}" for i in range(37)]
    todo = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image_id": ids, "uri": [f"s3://b/photo{i}.jpg" for i in range(37)],
                             "size": list(range(37))}), todo, row_group_size=5)
    return Plan(spill_dir=str(tmp_path), todo_path=str(todo))


@pytest.mark.parametrize("local_blocks_max, expected", [(6, "from_blocks"), (5, "from_arrow_refs")])
def test_one_block_per_batch_in_plan_order(local_ray, plan, monkeypatch, local_blocks_max, expected):
    import ray.data

    monkeypatch.setattr(pipeline, "LOCAL_BLOCKS_MAX", local_blocks_max)
    called = []
    for name in ("from_blocks", "from_arrow_refs"):
        def spy(*args, _name=name, _real=getattr(ray.data, name)):
            called.append(_name)
            return _real(*args)

        monkeypatch.setattr(ray.data, name, spy)
    ds = pipeline.input_dataset(plan, rows=8, first_rows=2)
    assert called == [expected]
    # 2, then 6 (the rest of the first batch), then 8, 8, 8 and 5: six blocks, as counted.
    assert ds.num_blocks() == pipeline.input_blocks(37, 8, 2) == 6
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert [b.num_rows for b in blocks] == [2, 6, 8, 8, 8, 5]
    assert pa.concat_tables(blocks).column("image_id").to_pylist() == [f"{i:040x}" for i in range(37)]


@pytest.mark.parametrize("todo, rows, first_rows", [(0, 16, 4), (1, 16, 4), (4, 16, 4), (5, 16, 4), (16, 16, 4),
                                                    (17, 16, 4), (33, 16, 4), (7, 1, 1), (100, 64, 16)])
def test_block_count_matches_the_plans_batches(tmp_path, todo, rows, first_rows):
    path = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image_id": [str(i) for i in range(todo)]}, schema=pa.schema([("image_id", pa.string())])),
                   path, row_group_size=7)
    batches = list(Plan(spill_dir=str(tmp_path), todo_path=str(path)).batches(rows=rows, first_rows=first_rows))
    assert pipeline.input_blocks(todo, rows, first_rows) == len(batches)
