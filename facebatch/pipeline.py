"""The indexing run on Ray Data: plan -> fetch+decode (tasks) -> detect+align+embed (actor pool) -> write.

This is the only module that imports `ray.data`. Everything it calls (storage, decode, inference,
tables) is plain Python tested without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, gpumem, models, raylogs, storage, tables
from .config import IndexConfig, pipeline_version

log = logging.getLogger("facebatch")

# Objects larger than this are not fetched at all (a 1 GiB "photo" is not one we can decode anyway).
MAX_OBJECT_BYTES = 1 << 30
DECODE_TASK_MEMORY = 512 * 1024 * 1024

DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("scale", pa.float32()),
        ("pix_h", pa.int32()),
        ("pix_w", pa.int32()),
        ("pixels", pa.large_binary()),  # RGB uint8, pix_h x pix_w x 3, row-major
        ("fetch_s", pa.float32()),
        ("decode_s", pa.float32()),
    ]
)

FACE_STRUCT = pa.struct(
    [
        ("face_index", pa.int32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("landmarks", pa.list_(pa.float32(), 10)),
        ("embedding", pa.list_(pa.float32(), tables.EMBEDDING_DIM)),
        ("face_size", pa.float32()),
        ("roll", pa.float32()),
        ("yaw", pa.float32()),
        ("sharpness", pa.float32()),
    ]
)


class RunFailed(RuntimeError):
    """The run as a whole failed (not one object): nothing of it was published."""


# Below this many failed fetches a run never fails as a whole (unless every object failed):
# a handful of vanished or unreadable objects in a small run are error rows, not an outage.
MIN_FAILED_FOR_RUN_FAILURE = 20


def too_many_fetch_failures(failed: int, total: int, max_error_rate: float) -> bool:
    """Is this a systemic failure (credentials, access, endpoint) rather than some bad objects?"""
    return failed > 0 and failed > max_error_rate * total and failed >= min(MIN_FAILED_FOR_RUN_FAILURE, total)


def _fetch_failure_message(run_id: str, failed: int, total: int, config: IndexConfig, errors: Counter) -> str:
    common, count = errors.most_common(1)[0] if errors else ("(no message)", 0)
    return (f"run {run_id} failed: {failed} of {total} objects could not be fetched, above --max-error-rate "
            f"{config.max_error_rate:g}; nothing was published. Most common error ({count}x): {common}")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- read + decode (Ray tasks)


def _decode_one(row: dict, data: bytes | None, fetch_error: str | None, max_pixels: int, max_side: int) -> dict:
    from .decode import DecodeError, decode_image

    out = {k: row.get(k) for k in ("image_id", "uri", "etag")}
    out.update(size_bytes=row.get("size"), width=None, height=None, format=None, error=None, scale=None,
               pix_h=None, pix_w=None, pixels=None, decode_s=0.0)
    if fetch_error is not None:
        out.update(status="fetch_failed", error=fetch_error)
        return out
    out["size_bytes"] = len(data)
    t0 = time.perf_counter()
    try:
        img = decode_image(data, max_pixels=max_pixels, max_side=max_side)
    except DecodeError as exc:
        out.update(status=exc.status, error=exc.message)
    except Exception as exc:  # a decoder bug must cost one row, never the run
        out.update(status="corrupt", error=f"decoder failed: {type(exc).__name__}: {exc}")
    else:
        rgb = np.ascontiguousarray(img.rgb)
        out.update(status="ok", width=img.width, height=img.height, format=img.format, scale=float(img.scale),
                   pix_h=rgb.shape[0], pix_w=rgb.shape[1], pixels=rgb.tobytes())
    out["decode_s"] = time.perf_counter() - t0
    return out


def _die_once(variable: str) -> None:
    """Fault-tolerance tests: the first worker to pass here exits hard (as on OOM-kill or a lost node).

    The variable names a marker file; whoever creates it first dies, later calls run normally.
    """
    marker = os.environ.get(variable)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def fetch_and_decode(batch: pa.Table, *, retries: int, endpoint: str | None, max_pixels: int, max_side: int) -> pa.Table:
    """Ray Data task: fetch a batch of objects concurrently (IO-bound), decode them one by one."""
    _die_once("FACEBATCH_FAULT_KILL_READ_TASK_ONCE")
    rows = batch.to_pylist()

    def fetch(row: dict) -> tuple[bytes | None, str | None, float]:
        t0 = time.perf_counter()
        size = row.get("size")
        if size is not None and size > MAX_OBJECT_BYTES:
            return None, f"object is {size:,} bytes, above the {MAX_OBJECT_BYTES:,}-byte fetch limit", 0.0
        try:
            data = storage.fetch_bytes(row["uri"], retries=retries, endpoint=endpoint)
            return data, None, time.perf_counter() - t0
        except storage.FetchError as exc:
            return None, str(exc), time.perf_counter() - t0
        except Exception as exc:  # unexpected client errors still become a row
            return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(rows)))) as pool:
        fetched = list(pool.map(fetch, rows))
    out_rows = []
    for row, (data, error, fetch_s) in zip(rows, fetched):
        decoded = _decode_one(row, data, error, max_pixels, max_side)
        decoded["fetch_s"] = fetch_s
        out_rows.append(decoded)
    return pa.Table.from_pylist(out_rows, schema=DECODED_SCHEMA)


# --------------------------------------------------------------------------- inference (Ray actors)


def _images_from_batch(batch: pa.Table, ok_idx: np.ndarray) -> list[np.ndarray]:
    """Zero-copy views of the decoded pixels of the ok rows."""
    pixels = batch.column("pixels").combine_chunks()
    offsets = np.frombuffer(pixels.buffers()[1], dtype=np.int64)[pixels.offset : pixels.offset + len(pixels) + 1]
    data = np.frombuffer(pixels.buffers()[2], dtype=np.uint8) if pixels.buffers()[2] is not None else np.zeros(0, np.uint8)
    hs = batch.column("pix_h").to_numpy(zero_copy_only=False)
    ws = batch.column("pix_w").to_numpy(zero_copy_only=False)
    return [data[offsets[i] : offsets[i + 1]].reshape(int(hs[i]), int(ws[i]), 3) for i in ok_idx]


def _faces_array(results: list, n_rows: int, ok_idx: np.ndarray, embed: bool) -> pa.Array:
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
        embedding = fixed(cat("embeddings", (tables.EMBEDDING_DIM,)), tables.EMBEDDING_DIM)
    else:
        embedding = pa.nulls(total, pa.list_(pa.float32(), tables.EMBEDDING_DIM))
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


class FaceModelActor:
    """Holds the models on one device; each call analyses a whole batch of decoded images.

    Errors: when the batch fails, it is retried image by image so that one bad image costs
    only its own row (`failed`); an out-of-memory error that the models' own halving could
    not avoid goes the same way (logged, counted in ``oom_retries``). Errors that leave the
    CUDA context unusable (:func:`facebatch.gpumem.is_fatal_device_error`: illegal memory
    access, device-side assert, launch failure, ...) are re-raised instead: the actor dies and
    Ray Data restarts it and retries the batch, rather than a poisoned actor marking every
    later image `failed`.
    """

    def __init__(self, device: str, detector_params: dict, embed: bool, torch_threads: int | None,
                 decode: dict | None = None):
        import torch

        from .config import DetectorParams
        from .inference import FaceAnalyzer

        if torch_threads:
            torch.set_num_threads(torch_threads)
            # OpenCV (decoding, resizing, alignment warps) has its own pool, sized to all of the
            # machine's cores by default: it would compete with torch's threads for this actor's.
            import cv2

            cv2.setNumThreads(torch_threads)
        params = DetectorParams(
            min_face_size=detector_params["min_face_size"],
            thresholds=tuple(detector_params["thresholds"]),
            scale_factor=detector_params["scale_factor"],
        )
        self.embed = embed
        self.decode = decode
        self.analyzer = FaceAnalyzer(device=device, detector_params=params, embed=embed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .inference import StageTimes

        _die_once("FACEBATCH_FAULT_KILL_ACTOR_ONCE")
        if self.decode is not None:
            # CPU-only pools fetch and decode in the actor itself (see default_sizing).
            batch = fetch_and_decode(batch, **self.decode)

        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        ok_idx = np.array([i for i, s in enumerate(status) if s == "ok"], dtype=np.int64)
        images = _images_from_batch(batch, ok_idx)
        scales = batch.column("scale").to_pylist()
        ok_scales = [float(scales[i]) for i in ok_idx]
        times = StageTimes()
        t0 = time.perf_counter()
        oom_before = self.analyzer.oom_retries
        batch_oom = 0
        try:
            results = self.analyzer.analyze(images, ok_scales, times)
        except Exception as exc:
            if gpumem.is_fatal_device_error(exc):
                log.error("device error, ending this actor so that Ray restarts it: %s: %s", type(exc).__name__, exc)
                raise
            if gpumem.is_oom(exc):
                batch_oom = 1
                gpumem.release_cached(self.analyzer.detector.device)
            log.warning("batch of %d images failed (%s: %s); retrying image by image", len(images),
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            del exc
            # Isolate the image that breaks the batch: the others still get their faces.
            results = []
            for j, (img, scale) in enumerate(zip(images, ok_scales)):
                try:
                    results.extend(self.analyzer.analyze([img], [scale], times))
                except Exception as exc:
                    if gpumem.is_fatal_device_error(exc):
                        log.error("device error, ending this actor so that Ray restarts it: %s: %s",
                                  type(exc).__name__, exc)
                        raise
                    i = int(ok_idx[j])
                    status[i] = "failed"
                    errors[i] = f"face analysis failed: {type(exc).__name__}: {exc}"
                    results.append(None)
        infer_s = time.perf_counter() - t0
        oom_retries = self.analyzer.oom_retries - oom_before + batch_oom
        keep = [k for k, r in enumerate(results) if r is not None]
        ok_idx_final = ok_idx[keep] if len(ok_idx) else ok_idx
        results = [results[k] for k in keep]
        num_faces = [None] * batch.num_rows
        for i, res in zip(ok_idx_final, results):
            num_faces[i] = len(res)
        n = max(1, batch.num_rows)
        out = batch.drop_columns(["pixels", "pix_h", "pix_w", "status", "error"])
        out = out.append_column("status", pa.array(status, pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        out = out.append_column("num_faces", pa.array(num_faces, pa.int32()))
        out = out.append_column("faces", _faces_array(results, batch.num_rows, ok_idx_final, self.embed))
        # Stage seconds, spread over the batch's rows so the driver can sum them per run.
        out = out.append_column("detect_s", pa.array(np.full(batch.num_rows, times.detect_s / n, np.float32)))
        out = out.append_column("embed_s", pa.array(np.full(batch.num_rows, times.embed_s / n, np.float32)))
        out = out.append_column("infer_s", pa.array(np.full(batch.num_rows, infer_s / n, np.float32)))
        # Out-of-memory retries of this batch, on its first row (the driver sums them).
        retries = np.zeros(batch.num_rows, np.int32)
        if batch.num_rows:
            retries[0] = oom_retries
        out = out.append_column("oom_retries", pa.array(retries, pa.int32()))
        return out


# --------------------------------------------------------------------------- driver


@dataclass
class RunSummary:
    run_id: str
    pipeline_version: str
    out: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def status_counts(self) -> dict[str, int]:
        return self.record.get("images_by_status", {})


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
            "indexed_at": pa.array([indexed_at] * n, pa.timestamp("us", tz="UTC")),
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


def _abort_quietly(writer: tables.RunWriter) -> None:
    """Delete a failed run's staged files; when storage is what failed, that may fail too, and then
    the next run's recovery discards them (they have no READY marker): the run's own error matters."""
    try:
        writer.abort()
    except storage.StorageError as exc:
        log.warning("could not delete the staged files of run %s (the next run discards them): %s", writer.run_id, exc)


def _abort_if_incomplete(writer: tables.RunWriter) -> None:
    if writer.state == "open":
        _abort_quietly(writer)


def _count_fetch_errors(images_rows: pa.Table, counter: Counter) -> None:
    failed = images_rows.filter(pc.equal(images_rows["status"], "fetch_failed"))
    for uri, error in zip(failed["uri"].to_pylist(), failed["error"].to_pylist()):
        counter[(error or "").replace(uri, "<uri>")] += 1


REPLACED_SCHEMA = pa.schema([("image_id", pa.string()), ("pipeline_version", pa.string())])


def stage_replaced_ids(plan, version: str, fs, location: storage.Location) -> None:
    """Stream the ids of the planned objects that already have a row (changed, retry, or anything
    but new under --full) to OUT/_staging/<run>/replaced.parquet, for tables.remove_superseded."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(location.fs_path(), REPLACED_SCHEMA, filesystem=fs) as writer:
        for batch in plan.batches(rows=100_000):
            ids = batch.column("image_id").filter(pc.not_equal(batch.column("change"), "new"))
            if len(ids):
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [ids, pa.array([version] * len(ids), pa.string())], schema=REPLACED_SCHEMA))


def default_sizing(config: IndexConfig, resources: dict[str, float], can_add_nodes: bool = False) -> dict[str, Any]:
    """Pool and batch sizes from the cluster's resources, unless the config sets them.

    The actor pool starts at ``num_actors`` and may grow to ``max_actors`` (Ray Data's autoscaling
    actor pool): on a cluster that can add nodes, the pending actors are what makes the autoscaler
    add GPU workers, and idle ones are released so the nodes can go. ``can_add_nodes`` says the
    run joined an existing cluster (which may autoscale from zero GPUs); a Ray instance this
    process starts itself has only the GPUs it sees.
    """
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if use_gpu:
        if gpus < 1:
            if not can_add_nodes:
                raise RuntimeError(f"device {config.device!r} asks for GPUs but this Ray instance has none")
            log.warning("no GPU in the Ray cluster yet: the inference actors wait for the autoscaler to add GPU nodes")
        num_actors = config.num_actors or max(1, gpus)
        return {
            "device": "cuda",
            "num_actors": num_actors,
            "max_actors": max(num_actors, config.max_actors or num_actors),
            "num_gpus": 1,
            "actor_cpus": 1,
            "torch_threads": None,
            "batch_size": config.batch_size or 64,
            # Separate decode tasks keep the GPUs fed: everything but one CPU per actor decodes.
            "decode_in_actor": config.decode_tasks is False,
            "read_concurrency": config.read_concurrency or max(1, cpus - num_actors),
        }
    # CPU: no accelerator to keep fed, and separate decode tasks would only compete with torch's
    # threads for the same cores (measured: 1.9x the bare model time on 2 cores, against 1.2x
    # with decoding in the actor). So each actor owns its cores and fetches + decodes its batches
    # itself; parallelism comes from more actors (one per 4 cores).
    num_actors = config.num_actors or max(1, cpus // 4)
    decode_in_actor = config.decode_tasks is not True
    # With separate decode tasks (--decode-tasks), a quarter of the cores is left to them.
    read_cpus = 0 if decode_in_actor else max(1, cpus // 4)
    actor_cpus = max(1, (cpus - read_cpus) // num_actors)
    return {
        "device": "cpu",
        "num_actors": num_actors,
        "max_actors": max(num_actors, config.max_actors or num_actors),
        "num_gpus": 0,
        "actor_cpus": actor_cpus,
        "torch_threads": actor_cpus,
        "batch_size": config.batch_size or 16,
        "decode_in_actor": decode_in_actor,
        "read_concurrency": None if decode_in_actor else (config.read_concurrency or read_cpus),
    }


def run_index(config: IndexConfig, ray_address: str | None = None, object_store_memory: int | None = None,
              progress: bool = True, on_batch: Callable[[int, int, float], None] | None = None) -> RunSummary:
    """Plan, run and publish one indexing run. Raises on failure of the run itself (not of single objects)."""
    before = tables.active_heartbeats()
    with contextlib.ExitStack() as on_exit:  # local clean-up (the plan's spill files), failed or not
        try:
            return _run_index(config, ray_address, object_store_memory, progress, on_batch, on_exit)
        except BaseException:
            # A failed run stops beating, so that the next run (from this long-lived process or
            # another machine) may finish or discard what it staged.
            for heartbeat in tables.active_heartbeats() - before:
                heartbeat.stop()
            raise


def _run_index(config: IndexConfig, ray_address: str | None, object_store_memory: int | None,
               progress: bool, on_batch: Callable[[int, int, float], None] | None,
               on_exit: contextlib.ExitStack) -> RunSummary:
    import ray

    from .plan import build_plan

    config.validate()
    t_start = time.perf_counter()
    out = storage.parse_location(config.out)
    endpoint = config.s3_endpoint_url()
    run_id = config.run_id or new_run_id()

    # One writer per OUT: a second `index`, `compact` or `people` on it stops here (LeaseHeld, exit 2).
    from .lease import Lease

    lease = on_exit.enter_context(Lease(out, endpoint, holder=f"facebatch index run {run_id}"))
    recovered = tables.recover_staging(out, endpoint)
    for action in recovered:
        log.warning("previous run %s was interrupted: %s", action["run_id"], action["action"])

    # Model hashes (and so the pipeline version) come from the files, before any cluster work.
    model_hashes = models.model_hashes(embed=config.embed)
    version = pipeline_version(model_hashes, config)

    t0 = time.perf_counter()
    plan = build_plan(config, version)
    on_exit.callback(plan.cleanup)
    plan_s = time.perf_counter() - t0
    todo = plan.num_todo
    log.info("plan: %s -> %d to process (%s)", config.source, todo, plan.counts)

    joined_cluster = bool(ray_address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        init_kwargs: dict[str, Any] = {"address": ray_address, "log_to_driver": True, "include_dashboard": False}
        if object_store_memory and not joined_cluster:
            init_kwargs["object_store_memory"] = object_store_memory
        raylogs.quiet_expected_log_messages()
        ray.init(**{k: v for k, v in init_kwargs.items() if v is not None})
    # After ray.init: the processes Ray starts must not inherit the filter's pipe.
    on_exit.callback(raylogs.StderrLineFilter().close)
    sizing = default_sizing(config, ray.cluster_resources(), can_add_nodes=joined_cluster)

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # keeps output sorted by image_id, as the plan is
    ctx.enable_progress_bars = progress and sys.stderr.isatty()

    indexed_at = datetime.now(timezone.utc)
    writer = tables.RunWriter(out, run_id, endpoint, row_group_size=config.rows_per_row_group)
    # A run that fails before its staged files are complete leaves neither them nor open uploads.
    on_exit.callback(_abort_if_incomplete, writer)
    status_counts: dict[str, int] = {}
    # Fetch errors with the object's own name taken out, so that one outage counts as one message.
    fetch_errors: Counter[str] = Counter()
    faces_total = 0
    stage = {"fetch_s": 0.0, "decode_s": 0.0, "detect_s": 0.0, "embed_s": 0.0, "infer_s": 0.0}
    processed = 0
    oom_retries = 0
    t_infer = time.perf_counter()
    first_batch_s, first_batch_rows = None, 0
    if todo:
        # One input block per inference batch: Ray Data hands an actor (and a decode task) a whole
        # input block per call, so big blocks would serialise the pool and, with preserve_order,
        # hold every result back until the block is done.
        refs = [ray.put(pa.Table.from_batches([b])) for b in plan.batches(rows=sizing["batch_size"])]
        ds = ray.data.from_arrow_refs(refs)
        decode_kwargs = {"retries": config.fetch_retries, "endpoint": endpoint, "max_pixels": config.max_pixels,
                         "max_side": config.max_side}
        if not sizing["decode_in_actor"]:
            ds = ds.map_batches(
                fetch_and_decode,
                batch_size=8,
                batch_format="pyarrow",
                fn_kwargs=decode_kwargs,
                num_cpus=1,
                # Decoding a photo near the pixel limit needs a few hundred MB: reserving it bounds
                # how many decodes a node runs at once. (It also keeps Ray Data from fusing decoding
                # into the GPU actors, so CPU workers decode while the actors infer.)
                memory=DECODE_TASK_MEMORY,
                compute=ray.data.TaskPoolStrategy(size=sizing["read_concurrency"]),
            )
        ds = ds.map_batches(
            FaceModelActor,
            batch_size=sizing["batch_size"],
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "device": sizing["device"],
                "detector_params": {
                    "min_face_size": config.detector.min_face_size,
                    "thresholds": list(config.detector.thresholds),
                    "scale_factor": config.detector.scale_factor,
                },
                "embed": config.embed,
                "torch_threads": sizing["torch_threads"],
                "decode": decode_kwargs if sizing["decode_in_actor"] else None,
            },
            # Ray Data restarts a lost actor and retries its batch (and retries lost read tasks)
            # by default, so a killed worker or a lost node costs time, not rows.
            # min = max is a fixed pool; a larger max lets it autoscale with the cluster.
            compute=ray.data.ActorPoolStrategy(min_size=sizing["num_actors"], max_size=sizing["max_actors"]),
            num_cpus=sizing["actor_cpus"],
            num_gpus=sizing["num_gpus"],
        )
        last_log = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            images_rows, faces_rows = split_output(batch, version, run_id, indexed_at)
            writer.write("faces", faces_rows)
            writer.write("images", images_rows)
            for s, c in zip(*np.unique(np.asarray(images_rows["status"].to_pylist(), dtype=object), return_counts=True)):
                status_counts[s] = status_counts.get(s, 0) + int(c)
            faces_total += faces_rows.num_rows
            _count_fetch_errors(images_rows, fetch_errors)
            failed = status_counts.get("fetch_failed", 0)
            if too_many_fetch_failures(failed, todo, config.max_error_rate):
                # The failures only grow, so the run is past the limit whatever the rest does: stop
                # now rather than after fetching (and paying for) the whole archive.
                _abort_quietly(writer)
                raise RunFailed(_fetch_failure_message(run_id, failed, todo, config, fetch_errors))
            for key in stage:
                stage[key] += float(pc.sum(batch[key]).as_py() or 0.0)
            oom_retries += int(pc.sum(batch["oom_retries"]).as_py() or 0)
            if first_batch_s is None:
                # Time to the first results: worker start-up, model loading, the first batch.
                first_batch_s, first_batch_rows = time.perf_counter() - t_infer, batch.num_rows
            processed += batch.num_rows
            tables.fault_point("write-after-first-batch")
            now = time.perf_counter()
            if on_batch is not None:  # (images processed, faces, seconds since processing began)
                on_batch(processed, faces_total, now - t_infer)
            if now - last_log > 10 or processed == todo:
                rate = processed / max(1e-9, now - t_infer)
                log.info("progress: %d/%d images (%.1f%%), %d faces, %.1f images/s", processed, todo,
                         100.0 * processed / todo, faces_total, rate)
                last_log = now
    rows = writer.close()
    process_s = time.perf_counter() - t_infer
    if rows["images"] != todo:
        raise RuntimeError(f"run {run_id} wrote {rows['images']} images rows for {todo} planned objects")

    record = {
        "run_id": run_id,
        "facebatch_version": __version__,
        "pipeline_version": version,
        "source": config.source,
        "out": config.out,
        "started_at": indexed_at.isoformat(),
        "objects": plan.counts,
        "processed": todo,
        "images_by_status": status_counts,
        "faces": faces_total,
        "seconds": {"plan": plan_s, "process": process_s, "total": time.perf_counter() - t_start,
                    **{f"{k[:-2]}_cpu_sum": v for k, v in stage.items()}},
        "images_per_second": todo / process_s if process_s > 0 else None,
        # Model calls halved after running out of device memory (0 when the memory model holds).
        "oom_retries": oom_retries,
        # After the first results arrive (start-up excluded): what a long run converges to.
        "first_results_s": first_batch_s,
        "steady_images_per_second": (todo - first_batch_rows) / (process_s - first_batch_s)
        if first_batch_s is not None and todo > first_batch_rows and process_s > first_batch_s else None,
        "sizing": sizing,
        "config": config.to_json(),
        "models": {name: {"sha256": sha} for name, sha in model_hashes.items()},
        "recovered_runs": recovered,
    }
    fs = storage.arrow_filesystem(out, endpoint)
    # What publishing must remove from older files: the rows this run replaces (never new objects,
    # which no older file holds) and, with --prune, the ids of objects gone from SOURCE.
    stage_replaced_ids(plan, version, fs, out.join("_staging", run_id, tables.REPLACED_FILE))
    if plan.deleted_ids_path:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(out.join("_staging", run_id, tables.PRUNE_FILE).fs_path(),
                              pa.schema([("image_id", pa.string())]), filesystem=fs) as prune:
            for batch in pq.ParquetFile(plan.deleted_ids_path, pre_buffer=False).iter_batches(columns=["image_id"]):
                prune.write_batch(batch)
    tables.fault_point("staged-before-record")
    tables.write_json(fs, out.join("_staging", run_id, "record.json"), record)
    tables.fault_point("staged-after-record")
    lease.check()  # taken over while this run was cut off: the other writer's recovery publishes it
    tables.publish_run(out, run_id, record, endpoint, heartbeat=writer.heartbeat)
    return RunSummary(run_id=run_id, pipeline_version=version, out=config.out, record=record)
