"""The run's input: one block per inference batch, in plan order, in waves of at most
WAVE_BLOCKS blocks, each one Ray dataset; a run in several waves writes what one wave writes."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facebatch import pipeline
from facebatch.plan import Plan


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module only (or the one another test file left running in this
    process), not the session-wide ray_local: the processes it started end with the module."""
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


@pytest.mark.parametrize("wave_blocks, waves", [(100, [[2, 6, 8, 8, 8, 5]]), (6, [[2, 6, 8, 8, 8, 5]]),
                                               (4, [[2, 6, 8, 8], [8, 5]]), (1, [[2], [6], [8], [8], [8], [5]])])
def test_waves_cut_the_plans_batches_in_order(plan, monkeypatch, wave_blocks, waves):
    monkeypatch.setattr(pipeline, "WAVE_BLOCKS", wave_blocks)
    got = list(pipeline.input_waves(plan, rows=8, first_rows=2))
    # 2, then 6 (the rest of the first batch), then 8, 8, 8 and 5: six blocks, as counted.
    assert [[t.num_rows for t in wave] for wave in got] == waves
    assert sum(len(wave) for wave in got) == pipeline.input_blocks(37, 8, 2)
    ids = [i for wave in got for t in wave for i in t.column("image_id").to_pylist()]
    assert ids == [f"{i:040x}" for i in range(37)]


def test_an_empty_plan_has_no_wave(tmp_path):
    todo = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image_id": pa.array([], pa.string())}), todo)
    assert list(pipeline.input_waves(Plan(spill_dir=str(tmp_path), todo_path=str(todo)), rows=8, first_rows=2)) == []


@pytest.mark.parametrize("wave_blocks", [4, 100])
def test_a_wave_handed_over_is_not_kept_by_the_generator(plan, monkeypatch, wave_blocks):
    """While a wave runs, the suspended generator holds none of its tables (full waves and the
    last one alike): they are freed with the wave's dataset, not at the end of the run."""
    import gc
    import weakref

    monkeypatch.setattr(pipeline, "WAVE_BLOCKS", wave_blocks)
    waves = pipeline.input_waves(plan, rows=8, first_rows=2)
    for wave in waves:
        refs = [weakref.ref(t) for t in wave]
        del wave
        gc.collect()
        assert all(r() is None for r in refs)


@pytest.mark.parametrize("has_from_blocks", [True, False])
def test_one_block_per_table_in_order(local_ray, plan, monkeypatch, has_from_blocks):
    """From the driver's tables (`from_blocks`) or, in a Ray without it, from the object store."""
    import ray.data

    if not has_from_blocks:
        monkeypatch.delattr(ray.data, "from_blocks")
    called = []
    for name in ("from_blocks", "from_arrow_refs"):
        real = getattr(ray.data, name, None)
        if real is not None:
            def spy(*args, _name=name, _real=real):
                called.append(_name)
                return _real(*args)

            monkeypatch.setattr(ray.data, name, spy)
    tables = next(pipeline.input_waves(plan, rows=8, first_rows=2))
    ds = pipeline.input_dataset(tables)
    assert called == ["from_blocks" if has_from_blocks else "from_arrow_refs"]
    assert ds.num_blocks() == 6
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert [b.num_rows for b in blocks] == [2, 6, 8, 8, 8, 5]
    assert pa.concat_tables(blocks).column("image_id").to_pylist() == [f"{i:040x}" for i in range(37)]


def test_a_run_in_several_waves_writes_what_one_wave_writes(local_ray, tmp_path, monkeypatch):
    """The demo archive (9 files: faces, no faces, broken files) at batch 2 is 6 input blocks:
    indexed in one wave and in three waves of 2 blocks, the published tables hold the same rows."""
    from facebatch.config import IndexConfig
    from facebatch.demo import build_demo_archive
    from facebatch.pipeline import run_index
    from facebatch.query import connect

    files = build_demo_archive(tmp_path)
    tables = {}
    for wave_blocks in (pipeline.WAVE_BLOCKS, 2):
        monkeypatch.setattr(pipeline, "WAVE_BLOCKS", wave_blocks)
        out = str(tmp_path / f"tables-{wave_blocks}")
        done = []
        summary = run_index(IndexConfig(source=str(tmp_path / "archive"), out=out, max_side=1024, batch_size=2).validate(),
                            progress=False, on_batch=lambda processed, faces, seconds: done.append(processed))
        # Every block once, in turn: 1 (the quarter batch), 1 (the rest of the first batch), 2, 2, 2, 1.
        assert done == [1, 2, 4, 6, 8, 9]
        assert sum(summary.record["images_by_status"].values()) == len(files) == 9
        assert summary.record["input_waves"] == (1 if wave_blocks > 6 else 3)
        con = connect(out)
        tables[wave_blocks] = (
            con.sql("SELECT * EXCLUDE (run_id, indexed_at) FROM images ORDER BY image_id").fetchall(),
            con.sql("SELECT * EXCLUDE (run_id) FROM faces ORDER BY image_id, face_index").fetchall(),
        )
    one, three = tables.values()
    assert one == three
    images, faces = one
    assert len(images) == 9 and len(faces) >= 6  # the demo's portraits are found


@pytest.mark.parametrize("todo, rows, first_rows", [(0, 16, 4), (1, 16, 4), (4, 16, 4), (5, 16, 4), (16, 16, 4),
                                                    (17, 16, 4), (33, 16, 4), (7, 1, 1), (100, 64, 16)])
def test_block_count_matches_the_plans_batches(tmp_path, todo, rows, first_rows):
    path = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image_id": [str(i) for i in range(todo)]}, schema=pa.schema([("image_id", pa.string())])),
                   path, row_group_size=7)
    batches = list(Plan(spill_dir=str(tmp_path), todo_path=str(path)).batches(rows=rows, first_rows=first_rows))
    assert pipeline.input_blocks(todo, rows, first_rows) == len(batches)


@pytest.mark.parametrize("low, high, batches, expected", [
    (16, 16, 1, (1, 1)),    # a nightly run of a few photos: one actor, not one per core
    (16, 16, 2, (2, 2)),
    (2, 2, 100, (2, 2)),    # enough batches: the pool as sized
    (1, 8, 3, (1, 3)),      # an autoscaling pool grows no further than there are batches
    (4, 8, 0, (1, 1)),
])
def test_a_wave_never_starts_more_actors_than_it_has_batches(low, high, batches, expected):
    sizing = {"device": "cuda", "num_actors": low, "max_actors": high, "actors_per_gpu": 1, "actor_cpus": 1}
    capped = pipeline.sizing_for_batches(sizing, batches)
    assert (capped["num_actors"], capped["max_actors"]) == expected
    assert capped["actor_cpus"] == 1 and sizing["num_actors"] == low  # the run's sizing is left as it was


@pytest.mark.parametrize("device, low, high, per_gpu, wave, gpus, expected", [
    ("cuda", 1, 8, 1, 1, 6, 1),    # the first wave starts at the minimum and lets the autoscaler add nodes
    ("cuda", 1, 8, 1, 2, 6, 6),    # later waves start on the GPUs the earlier ones scaled up to
    ("cuda", 1, 8, 2, 2, 6, 8),    # two actors per GPU, capped at the maximum
    ("cuda", 2, 8, 1, 3, 0, 2),    # no GPU left in the cluster: the minimum, the autoscaler adds nodes again
    ("cuda", 4, 4, 1, 2, 6, 4),    # a fixed pool stays fixed
    ("cpu", 1, 4, 1, 2, 0, 1),     # CPU pools are not scaled up front
])
def test_later_waves_start_the_pool_at_the_clusters_gpus(device, low, high, per_gpu, wave, gpus, expected):
    sizing = {"device": device, "num_actors": low, "max_actors": high, "actors_per_gpu": per_gpu}
    assert pipeline.initial_pool_size(sizing, wave, gpus) == expected
