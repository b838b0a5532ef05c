"""Planning, the table writer and the publish protocol, on local disk and on a real S3 server (no Ray, no models)."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facebatch import publishing, recovery, storage, writing
from facebatch.out import Out
from facebatch.config import ConfigError, IndexConfig
from facebatch.plan import build_plan


def _images_rows(ids, etags, statuses, version="v1-test", run_id="r1"):
    n = len(ids)
    now = datetime.now(timezone.utc)
    return pa.table(
        {
            "image_id": ids,
            "uri": ids,
            "etag": etags,
            "size_bytes": [10] * n,
            "width": [100] * n,
            "height": [80] * n,
            "format": ["JPEG"] * n,
            "status": statuses,
            "error": [None if s == "ok" else "bad" for s in statuses],
            "num_faces": [1 if s == "ok" else None for s in statuses],
            "pipeline_version": [version] * n,
            "run_id": [run_id] * n,
            "indexed_at": [now] * n,
        }
    )


def _faces_rows(ids, version="v1-test", run_id="r1"):
    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "face_index": [0] * n,
            "box": [[1.0, 2.0, 30.0, 40.0]] * n,
            "score": [0.99] * n,
            "landmarks": [[float(i) for i in range(10)]] * n,
            "embedding": [[1.0] + [0.0] * 127] * n,
            "face_size": [28.0] * n,
            "roll": [0.0] * n,
            "yaw": [0.0] * n,
            "sharpness": [10.0] * n,
            "pipeline_version": [version] * n,
            "run_id": [run_id] * n,
        }
    )


def _publish(out: str, run_id: str, ids, etags, statuses, version="v1-test", endpoint=None):
    location = Out.from_uri(out, endpoint)
    writer = writing.RunWriter(location, run_id)
    writer.write("faces", _faces_rows([i for i, s in zip(ids, statuses) if s == "ok"], version, run_id))
    writer.write("images", _images_rows(ids, etags, statuses, version, run_id))
    writer.close()
    publishing.publish_run(location, run_id, {"run_id": run_id})


def test_local_listing_is_sorted_and_skips_hidden(tmp_path):
    for rel in ["b/z.jpg", "b.jpg", "a/c/d.jpg", "a/e.jpg", ".hidden/x.jpg", "a/.DS_Store"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 3)
    config = IndexConfig(source=str(tmp_path), out=str(tmp_path / "out")).validate()
    plan = build_plan(config, "v1-test")
    ids = [r["image_id"] for b in plan.batches() for r in b.to_pylist()]
    expected = sorted(str(tmp_path / rel) for rel in ["b/z.jpg", "b.jpg", "a/c/d.jpg", "a/e.jpg"])
    assert ids == expected  # byte order of full paths: what keeps output files sorted
    assert plan.counts == {"new": 4, "changed": 0, "retry": 0, "unchanged": 0, "listed": 4, "deleted": 0}
    # A short first batch (first results sooner), then full ones, every object once, in order.
    sized = list(plan.batches(rows=3, first_rows=1))
    assert [b.num_rows for b in sized] == [1, 2, 1]
    assert [r["image_id"] for b in sized for r in b.to_pylist()] == expected
    assert [b.num_rows for b in plan.batches(rows=3, first_rows=5)] == [3, 1]
    plan.cleanup()


def test_manifest_with_ids_and_bad_manifests_fail_fast(tmp_path):
    (tmp_path / "img.jpg").write_bytes(b"x")
    good = tmp_path / "good.csv"
    good.write_text("uri,image_id\nimg.jpg,photo-2\n/abs/other.jpg,photo-1\n")
    plan = build_plan(IndexConfig(source=str(good), out=str(tmp_path / "out")).validate(), "v")
    rows = [r for b in plan.batches() for r in b.to_pylist()]
    assert [(r["image_id"], r["uri"]) for r in rows] == [("photo-1", "/abs/other.jpg"), ("photo-2", str(tmp_path / "img.jpg"))]

    dup = tmp_path / "dup.csv"
    dup.write_text("uri,image_id\na.jpg,x\nb.jpg,x\n")
    with pytest.raises(ConfigError, match="image_id 'x' 2 times"):
        build_plan(IndexConfig(source=str(dup), out=str(tmp_path / "out")).validate(), "v")
    no_uri = tmp_path / "nouri.csv"
    no_uri.write_text("path\na.jpg\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        build_plan(IndexConfig(source=str(no_uri), out=str(tmp_path / "out")).validate(), "v")
    with pytest.raises(ConfigError, match="does not exist"):
        build_plan(IndexConfig(source=str(tmp_path / "missing.parquet"), out=str(tmp_path / "out")).validate(), "v")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_side": 10}, "max_side"),
        ({"device": "tpu"}, "device must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"full": True, "reprocess_errors": True}, "--full already reprocesses"),
        ({"max_pixels": 10}, "max_pixels"),
    ],
)
def test_bad_config_fails_fast_with_a_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IndexConfig(source="s3://b/p", out="/tmp/x", **kwargs).validate()


def test_incremental_classification(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]:
        (src / name).write_bytes(b"data")
    out = str(tmp_path / "out")
    config = IndexConfig(source=str(src), out=out).validate()
    listed = {r["image_id"]: r["etag"] for b in build_plan(config, "v1-test").batches() for r in b.to_pylist()}
    ids = sorted(listed)
    # Earlier run: a ok (same etag), b ok (old etag), c failed, gone.jpg ok (deleted since); d never seen.
    gone = str(src / "gone.jpg")
    prev_ids = sorted([ids[0], ids[1], ids[2], gone])
    etags = {ids[0]: listed[ids[0]], ids[1]: "old-etag", ids[2]: listed[ids[2]], gone: "e"}
    statuses = {ids[0]: "ok", ids[1]: "ok", ids[2]: "corrupt", gone: "ok"}
    _publish(out, "r1", prev_ids, [etags[i] for i in prev_ids], [statuses[i] for i in prev_ids])

    plan = build_plan(config, "v1-test")
    todo = {r["image_id"]: r["change"] for b in plan.batches() for r in b.to_pylist()}
    assert todo == {ids[1]: "changed", ids[3]: "new"}
    assert plan.counts == {"new": 1, "changed": 1, "retry": 1, "unchanged": 1, "listed": 4, "deleted": 1}

    retry = build_plan(IndexConfig(source=str(src), out=out, reprocess_errors=True).validate(), "v1-test")
    assert {r["image_id"] for b in retry.batches() for r in b.to_pylist()} == {ids[1], ids[2], ids[3]}
    full = build_plan(IndexConfig(source=str(src), out=out, full=True).validate(), "v1-test")
    assert full.num_todo == 4
    other_version = build_plan(config, "v1-other")
    assert other_version.counts["new"] == 4 and other_version.num_todo == 4
    limited = build_plan(IndexConfig(source=str(src), out=out, full=True, limit=3).validate(), "v1-test")
    assert limited.num_todo == 3


def test_writer_publishes_sorted_files_with_statistics(tmp_path):
    out = str(tmp_path / "out")
    location = Out.from_uri(out)
    writer = writing.RunWriter(location, "run-a", row_group_size=1000)
    ids = [f"img-{i:05d}" for i in range(2500)]
    for start in range(0, 2500, 700):
        chunk = ids[start : start + 700]
        writer.write("faces", _faces_rows(chunk, run_id="run-a"))
        writer.write("images", _images_rows(chunk, ["e"] * len(chunk), ["ok"] * len(chunk), run_id="run-a"))
    with pytest.raises(RuntimeError, match="out of image_id order"):
        writer.write("images", _images_rows(["img-00001"], ["e"], ["ok"], run_id="run-a"))
    assert writer.close() == {"images": 2500, "faces": 2500}
    # Staged files are invisible to *.parquet globs until published.
    assert location.list_table_files("faces") == []
    publishing.publish_run(location, "run-a", {"run_id": "run-a"})
    files = location.list_table_files("faces")
    assert [f.rsplit("/", 1)[1] for f in files] == ["run-a.parquet"]
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.num_row_groups >= 2
    bounds = [(meta.row_group(i).column(0).statistics.min, meta.row_group(i).column(0).statistics.max) for i in range(meta.num_row_groups)]
    assert bounds == sorted(bounds) and all(lo <= hi for lo, hi in bounds)
    assert pq.read_schema(files[0]).field("embedding").type == pa.list_(pa.float32(), 128)
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/images/*.parquet')").fetchone()[0]
    assert count == 2500
    assert (tmp_path / "out" / "_runs" / "run-a.json").is_file()
    assert not (tmp_path / "out" / "_staging" / "run-a").exists()


def test_recovery_publishes_complete_runs_and_discards_partial_ones(tmp_path):
    location = Out.from_uri(str(tmp_path / "out"))
    # Run 1 staged completely (READY + record) but died before publishing.
    w = writing.RunWriter(location, "run-1")
    w.write("faces", _faces_rows(["a"], run_id="run-1"))
    w.write("images", _images_rows(["a"], ["e"], ["ok"], run_id="run-1"))
    w.close()
    location.write_json(location.join("_staging", "run-1", "record.json"), {"run_id": "run-1"})
    # Run 2 died while writing (no READY marker).
    w2 = writing.RunWriter(location, "run-2")
    w2.write("images", _images_rows(["b"], ["e"], ["ok"], run_id="run-2"))
    actions = recovery.recover_staging(location)
    assert sorted((a["run_id"], a["action"]) for a in actions) == [("run-1", "published"), ("run-2", "discarded")]
    assert [f.rsplit("/", 1)[1] for f in location.list_table_files("images")] == ["run-1.parquet"]
    assert recovery.recover_staging(location) == []  # idempotent


def test_s3_listing_pagination_and_publish(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="listing")
    keys = [f"photos/{i % 7}/img-{i:04d}.jpg" for i in range(1105)]  # more than one 1,000-key page
    for key in keys:
        client.put_object(Bucket="listing", Key=key, Body=b"x")
    client.put_object(Bucket="listing", Key="photos-old/not-this.jpg", Body=b"x")
    listed = list(storage.list_objects(storage.parse_location("s3://listing/photos")))
    assert [o.uri for o in listed] == sorted(f"s3://listing/{k}" for k in keys)
    assert all(o.size == 1 and o.etag for o in listed)

    _publish("s3://listing/index", "run-s3", ["s3://listing/photos/0/img-0000.jpg"], ["e"], ["ok"])
    location = Out.from_uri("s3://listing/index")
    assert [f.rsplit("/", 1)[1] for f in location.list_table_files("images")] == ["run-s3.parquet"]
    from facebatch.query import connect

    con = connect("s3://listing/index")
    assert con.sql("SELECT image_id, status FROM images").fetchall() == [("s3://listing/photos/0/img-0000.jpg", "ok")]
    assert con.sql("SELECT count(*) FROM faces").fetchone()[0] == 1


def test_changed_objects_replace_their_rows_and_prune_removes_deleted(tmp_path):
    out = str(tmp_path / "out")
    location = Out.from_uri(out)
    _publish(out, "run-1", ["a", "b", "c"], ["e1", "e1", "e1"], ["ok", "ok", "corrupt"])
    _publish(out, "run-0", ["x"], ["e1"], ["ok"], version="v0-older")
    # run-2 reprocesses b (changed) and c (retried); the older rows of b and c must disappear.
    _publish(out, "run-2", ["b", "c"], ["e2", "e1"], ["ok", "ok"])
    con = duckdb.connect()
    rows = con.sql(f"SELECT image_id, etag, run_id FROM read_parquet('{out}/images/*.parquet') ORDER BY image_id").fetchall()
    assert rows == [("a", "e1", "run-1"), ("b", "e2", "run-2"), ("c", "e1", "run-2"), ("x", "e1", "run-0")]
    faces = con.sql(f"SELECT image_id, run_id FROM read_parquet('{out}/faces/*.parquet') ORDER BY image_id").fetchall()
    assert faces == [("a", "run-1"), ("b", "run-2"), ("c", "run-2"), ("x", "run-0")]

    # A run with --prune: 'a' was deleted from the source.
    writer = writing.RunWriter(location, "run-3")
    writer.close()
    pq.write_table(pa.table({"image_id": ["a"]}), str(tmp_path / "out" / "_staging" / "run-3" / "prune.parquet"))
    publishing.publish_run(location, "run-3", {"run_id": "run-3"})
    ids = [r[0] for r in con.sql(f"SELECT image_id FROM read_parquet('{out}/images/*.parquet') ORDER BY 1").fetchall()]
    assert ids == ["b", "c", "x"]
    assert [r[0] for r in con.sql(f"SELECT image_id FROM read_parquet('{out}/faces/*.parquet') ORDER BY 1").fetchall()] == ["b", "c", "x"]


def test_compaction_merges_sorted_and_keeps_every_row(tmp_path):
    from facebatch.compact import compact

    out = str(tmp_path / "out")
    # Eight nightly runs whose id ranges interleave.
    for night in range(8):
        ids = [f"img-{i:04d}" for i in range(night, 400, 8)]
        _publish(out, f"run-{night}", ids, ["e"] * len(ids), ["ok"] * len(ids))
    con = duckdb.connect()
    before = con.sql(f"SELECT * FROM read_parquet('{out}/faces/*.parquet') ORDER BY image_id").fetchall()
    report = compact(Out.from_uri(out), target_rows=150, row_group_size=50)
    assert report["tables"]["faces"] == {"files_before": 8, "files_after": 3, "rows": 400}
    after = con.sql(f"SELECT * FROM read_parquet('{out}/faces/*.parquet') ORDER BY image_id").fetchall()
    assert after == before
    location = Out.from_uri(out)
    files = location.list_table_files("faces")
    ranges = []
    for path in files:
        col = pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()
        assert col == sorted(col)
        ranges.append((col[0], col[-1]))
    assert ranges == sorted(ranges) and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, ordered
    assert not (tmp_path / "out" / "_staging").exists() or not any((tmp_path / "out" / "_staging").iterdir())
    assert compact(Out.from_uri(out))["tables"]["faces"] == {"files_before": 3, "files_after": 1, "rows": 400}


def test_interrupted_compaction_is_finished_by_the_next_run(tmp_path):
    from facebatch.compact import finish_compaction

    out = str(tmp_path / "out")
    for night in range(3):
        _publish(out, f"run-{night}", [f"n{night}"], ["e"], ["ok"])
    location = Out.from_uri(out)
    fs = location.fs
    # Simulate a crash after the journal was written and one file was swapped in.
    staged = location.join("_staging", "compact-x", "faces", "part-00000.parquet")
    (tmp_path / "out" / "_staging" / "compact-x" / "faces").mkdir(parents=True)
    merged = pa.concat_tables([pq.read_table(f) for f in location.list_table_files("faces")])
    pq.write_table(merged, staged.fs_path())
    old = location.list_table_files("faces")
    location.write_json(location.join("_staging", "compact-x", "compact.json"),
                      {"add": [{"staged": staged.fs_path(), "final": location.join("faces", "compact-x-00000.parquet").fs_path()}], "remove": old})
    fs.delete_file(old[0])  # part of the removal already happened
    assert recovery.recover_staging(location) == [{"run_id": "compact-x", "action": "finished compaction"}]
    assert [p.rsplit("/", 1)[1] for p in location.list_table_files("faces")] == ["compact-x-00000.parquet"]
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/faces/*.parquet')").fetchone()[0] == 3
    assert not finish_compaction(location, "compact-x")


def test_recovery_leaves_a_live_run_alone(tmp_path):
    import json
    import socket
    import subprocess

    location = Out.from_uri(str(tmp_path / "out"))
    staging = tmp_path / "out" / "_staging" / "run-live"
    staging.mkdir(parents=True)
    (staging / "images.parquet").write_bytes(b"partial")
    other_driver = subprocess.Popen(["sleep", "60"])
    try:
        (staging / "HEARTBEAT").write_text(json.dumps({"host": socket.gethostname(), "pid": other_driver.pid, "time": 0}))
        assert recovery.recover_staging(location) == [{"run_id": "run-live", "action": "left alone: another run is writing it"}]
        assert (staging / "images.parquet").exists()
        # On another machine, only the heartbeat's age tells: a fresh one is live, an old one is not.
        (staging / "HEARTBEAT").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": __import__("time").time()}))
        assert recovery.recover_staging(location)[0]["action"].startswith("left alone")
    finally:
        other_driver.kill()
        other_driver.wait()
    (staging / "HEARTBEAT").write_text(json.dumps({"host": socket.gethostname(), "pid": other_driver.pid, "time": 0}))
    assert recovery.recover_staging(location) == [{"run_id": "run-live", "action": "discarded"}]
    assert not staging.exists()


def test_unlistable_sources_fail_fast(tmp_path, s3_server):
    with pytest.raises(ConfigError, match="does not exist"):
        build_plan(IndexConfig(source=str(tmp_path / "nope"), out=str(tmp_path / "out")).validate(), "v")
    with pytest.raises(ConfigError, match="cannot list SOURCE s3://no-such-bucket/photos: .*NoSuchBucket"):
        build_plan(IndexConfig(source="s3://no-such-bucket/photos", out=str(tmp_path / "out")).validate(), "v")


def test_default_sizing_follows_the_cluster():
    from facebatch.pipeline import cpu_actor_memory, default_sizing

    cfg = IndexConfig(source="/x", out="/y").validate()
    # On CPU, one single-threaded actor per core while the node's memory holds them, each
    # reserving its estimated memory (about 1.4 GB at batch 16 and max side 2048) ...
    cpu = default_sizing(cfg, {"CPU": 16, "memory": 64 * 2**30})
    assert cpu["device"] == "cpu" and cpu["num_actors"] == cpu["max_actors"] == 16
    assert cpu["actor_cpus"] == cpu["torch_threads"] == 1 and cpu["actor_memory"] == cpu_actor_memory(16, 2048)
    assert cpu["decode_in_actor"] and cpu["batch_size"] == 16
    assert 1.3e9 < cpu_actor_memory(16, 2048) < 1.5e9

    def pool(config, resources, nodes=None, can_add_nodes=False):
        sizing = default_sizing(config, resources, can_add_nodes=can_add_nodes, nodes=nodes)
        return sizing["num_actors"], sizing["actor_cpus"]

    # ... else fewer actors with more threads each, the fewest threads for which the actors the
    # cores take also fit the memory: 7 GiB holds 5 actors, so 16 cores make 5 actors of 3 threads.
    assert pool(cfg, {"CPU": 16, "memory": 7 * 2**30}) == (5, 3)
    assert pool(cfg, {"CPU": 10, "memory": 4 * 2**30}) == (3, 3)
    assert pool(cfg, {"CPU": 2, "memory": 20 * 2**30}) == (2, 1)
    # Memory known to hold no actor anywhere: one actor on all the cores, reserving nothing.
    assert pool(cfg, {"CPU": 8, "memory": 2**30}) == (1, 8)
    assert default_sizing(cfg, {"CPU": 8, "memory": 2**30})["actor_memory"] is None
    # Larger batches and images need more memory per actor, so fewer fit.
    big = IndexConfig(source="/x", out="/y", batch_size=64, max_side=4096).validate()
    assert pool(big, {"CPU": 16, "memory": 64 * 2**30}) == (5, 3)
    # Per node, as Ray places actors (by CPU): a KubeRay head with memory but no CPUs takes none
    # and lends the worker none of its memory; a small head's memory keeps actors off it (they
    # reserve memory), and two nodes too small for one actor get one, not one per core.
    gib = 2**30
    assert pool(cfg, {"CPU": 16, "memory": 72 * gib}, [{"memory": 64 * gib}, {"CPU": 16, "memory": 8 * gib}]) == (5, 3)
    assert pool(cfg, {"CPU": 18, "memory": 65 * gib}, [{"CPU": 2, "memory": gib}, {"CPU": 16, "memory": 64 * gib}]) == (16, 1)
    assert pool(cfg, {"CPU": 16, "memory": 2 * gib}, [{"CPU": 8, "memory": gib}, {"CPU": 8, "memory": gib}]) == (1, 8)
    # With decode tasks, their cores and reserved memory come off first.
    assert pool(IndexConfig(source="/x", out="/y", decode_tasks=True).validate(), {"CPU": 16, "memory": 7 * gib}) == (3, 4)
    # --num-actors decides, and the cores are shared among them.
    assert pool(IndexConfig(source="/x", out="/y", num_actors=2).validate(), {"CPU": 16, "memory": 64 * gib}) == (2, 8)
    tasks = default_sizing(IndexConfig(source="/x", out="/y", decode_tasks=True).validate(), {"CPU": 2})
    # Never more CPUs asked than the cluster has: the decode task must still find a core.
    assert tasks["actor_cpus"] * tasks["num_actors"] + tasks["read_concurrency"] <= 2
    gpu = default_sizing(cfg, {"CPU": 32, "GPU": 4})
    assert gpu["device"] == "cuda" and gpu["num_actors"] == 4 and gpu["num_gpus"] == 1 and not gpu["decode_in_actor"]
    assert gpu["read_concurrency"] == 28 and gpu["batch_size"] == 64
    assert gpu["max_actors"] == 4  # a fixed pool unless --max-actors says otherwise
    # Fractional GPUs: two actors per GPU, each asking Ray for half of one.
    shared = default_sizing(IndexConfig(source="/x", out="/y", actors_per_gpu=2).validate(), {"CPU": 32, "GPU": 4})
    assert (shared["num_actors"], shared["num_gpus"], shared["actors_per_gpu"]) == (8, 0.5, 2)
    assert shared["read_concurrency"] == 24
    with pytest.raises(ConfigError, match="actors_per_gpu must be an integer from 1 to 8"):
        IndexConfig(source="/x", out="/y", actors_per_gpu=0).validate()
    with pytest.raises(RuntimeError, match="has none"):
        default_sizing(IndexConfig(source="/x", out="/y", device="cuda").validate(), {"CPU": 8})
    # nvJPEG decodes on the actors' GPUs: refused, with the reason, when the actors use the CPU.
    with pytest.raises(ConfigError, match="--gpu-jpeg-decode needs CUDA inference actors"):
        default_sizing(IndexConfig(source="/x", out="/y", gpu_jpeg_decode=True).validate(), {"CPU": 8})
    assert default_sizing(IndexConfig(source="/x", out="/y", gpu_jpeg_decode=True).validate(),
                          {"CPU": 8, "GPU": 1})["device"] == "cuda"


def test_the_actor_pool_can_grow_with_the_cluster():
    """KubeRay / `ray up` GPU workers scale from their minimum: the pool starts small and grows."""
    from facebatch.pipeline import default_sizing

    scaling = IndexConfig(source="/x", out="/y", device="cuda", num_actors=1, max_actors=4).validate()
    # Joined a cluster that has no GPU node yet: the pending actor is what makes the autoscaler add one.
    sizing = default_sizing(scaling, {"CPU": 4}, can_add_nodes=True)
    assert (sizing["num_actors"], sizing["max_actors"], sizing["num_gpus"]) == (1, 4, 1)
    # On CPU, --max-actors alone caps the default pool: fewer, wider actors, a fixed pool unless
    # the cluster can add nodes for more.
    def cpu_pool(max_actors, cpus, can_add_nodes=False):
        sizing = default_sizing(IndexConfig(source="/x", out="/y", max_actors=max_actors).validate(),
                                {"CPU": cpus, "memory": 64 * 2**30}, can_add_nodes=can_add_nodes)
        return sizing["num_actors"], sizing["max_actors"], sizing["actor_cpus"]

    assert cpu_pool(3, 4) == (3, 3, 1)
    assert cpu_pool(5, 16) == (5, 5, 3)
    assert cpu_pool(5, 2) == (2, 2, 1)
    assert cpu_pool(5, 2, can_add_nodes=True) == (2, 5, 1)
    with pytest.raises(ConfigError, match="below --num-actors"):
        IndexConfig(source="/x", out="/y", num_actors=4, max_actors=2).validate()


def test_an_index_run_refuses_a_gpu_number_instead_of_changing_it():
    # Ray sets CUDA_VISIBLE_DEVICES per actor: cuda:1 could not mean what the user asked for.
    with pytest.raises(ConfigError, match="Ray assigns each inference actor its own GPU"):
        IndexConfig(source="/x", out="/y", device="cuda:1").validate()
    with pytest.raises(ConfigError, match="device must be one of"):
        IndexConfig(source="/x", out="/y", device="tpu").validate()


def test_query_connect_on_an_index_without_faces(tmp_path):
    from facebatch.query import connect

    out = tmp_path / "it's here"  # a quote in the path, too
    _publish(str(out), "run-1", ["a", "b"], ["e", "e"], ["corrupt", "not_image"])
    con = connect(str(out))
    assert con.sql("SELECT count(*) FROM images").fetchone()[0] == 2
    assert con.sql("SELECT count(*) FROM faces").fetchone()[0] == 0
    assert "embedding" in [c[0] for c in con.sql("DESCRIBE faces").fetchall()]


def test_s3_keys_with_url_characters_keep_their_names():
    for key in ("photos/a#1.jpg", "photos/what?.jpg", "photos/x;y.jpg", "photos/ü 2.jpg"):
        location = storage.parse_location(f"s3://bucket/{key}")
        assert (location.bucket, location.path) == ("bucket", key)
        assert location.uri() == f"s3://bucket/{key}"
    with pytest.raises(ValueError, match="no bucket"):
        storage.parse_location("s3:///photos")
