"""The indexing run on Ray Data: the wiring of the stages, in the order a run goes through them.

    lease + recover (lease.py, recovery.py) -> plan (plan.py) -> read: fetch + decode Ray tasks
    (reading.py) -> infer: the FaceModelActor pool (inference.py) -> write: the driver streams rows
    into the run's staged files (writing.py) -> publish (publishing.py)

This is the only module that imports `ray.data`. Everything it calls is plain Python tested
without Ray; what happens to OUT at each step is drawn in ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Not gpumem (nor anything else that imports torch): the driver needs no torch, which takes about
# a second and 180 MiB to import; the actors import it where they use it.
from . import __version__, models, raylogs, storage
from .config import ConfigError, IndexConfig, pipeline_version
from .out import Out, active_heartbeats, fault_point
from .publishing import publish_run
from .recovery import recover_staging
from .reading import batch_images, die_once, fetch_and_decode
from .writing import RunWriter, faces_array, split_output, stage_pruned_ids, stage_replaced_ids

log = logging.getLogger("facebatch")

# Decoding a photo near the pixel limit needs a few hundred MB: what a read task reserves.
DECODE_TASK_MEMORY = 512 * 1024 * 1024


def cpu_actor_memory(batch_size: int, max_side: int) -> int:
    """An estimate of a CPU inference actor's peak memory, used to decide how many actors a node's
    memory holds: torch, the models and their buffers (about 0.7 GiB), plus about 10 bytes per pixel
    of a batch of images at the --max-side bound (decoded RGB, the pyramid, P-Net's activations).
    Measured: 1,319-1,346 MiB peak RSS per actor at batch 16 and max side 2048 on the corpus photos,
    against 1,340 MiB (1.4 GB) estimated for the square bound; the RSS counts shared libraries
    in full, so the estimate is about what an actor really adds."""
    return 700 * 2**20 + batch_size * max_side * max_side * 10


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


# --------------------------------------------------------------------------- inference (Ray actors)


#: A run's input reaches Ray Data in waves of at most this many blocks: each wave is one dataset,
#: built with `from_blocks`, which computes the blocks' metadata in the driver. Measured on 2 cores
#: (bench/bench_run_start.py): 0.02 s for 11 blocks, 8.2-10.0 s for 5,000 (1.6-2.0 ms a block).
#: `from_arrow_refs` instead reads each block's metadata with one remote task: 1.7 s for 11 blocks,
#: 29-33 s for 5,000, which would have made a plan of 10 million objects (625,000 blocks at CPU
#: batch 16) wait about an hour before its first result. A wave bounds the driver's memory too:
#: until its dataset exists each block is a Python table there, about 2 KB of objects plus its
#: rows (about 190 bytes each for S3 keys), so about 100 MB per wave at CPU batches of 16 rows and
#: 290 MB at GPU batches of 64. Between two full waves the actors wait for the next wave's set-up
#: (about 33-40 s at the rate above) and then restart (4-6 s on 2 cores): small against a
#: wave, which is 320,000 objects at CPU batch 16 (about 11 hours for one 2-core actor) and
#: 1.28 million at GPU batch 64.
WAVE_BLOCKS = 20_000


def input_blocks(todo: int, rows: int, first_rows: int) -> int:
    """How many blocks Plan.batches(rows, first_rows) cuts `todo` objects into."""
    # Batches of `rows`; the first is cut in two when it holds more than first_rows objects.
    return -(-todo // rows) + (1 if min(rows, todo) > first_rows else 0)


def input_waves(plan, rows: int, first_rows: int) -> Iterator[list[pa.Table]]:
    """The plan's objects as `rows`-row tables (the first one `first_rows`), in plan order, in
    lists of at most WAVE_BLOCKS: one table per inference batch, one list per dataset (see
    _run_index). Read from the plan's spill file one wave at a time."""
    tables = (pa.Table.from_batches([batch]) for batch in plan.batches(rows=rows, first_rows=first_rows))
    while True:
        # Handed over out of a one-element list, so that this generator keeps no reference while
        # it is suspended: the caller's dataset alone holds a wave's blocks while the wave runs.
        wave = [list(itertools.islice(tables, WAVE_BLOCKS))]
        if not wave[0]:
            return
        yield wave.pop()


# The modules that both a local `ray.init` and `import ray.data` load (Ray 2.60; checked by
# tests/test_ray_start_overlap.py). They are loaded first, so that the two can run side by side
# without importing any module from both threads at once (where Python's per-module import locks
# could meet in a cycle and hand one thread a half-initialised module).
IMPORTED_BY_RAY_INIT_AND_RAY_DATA = ("gzip", "pkgutil", "socketserver", "ray.dashboard", "ray._common.usage.usage_lib")


def import_ray_data_alongside() -> threading.Thread:
    """Start importing ray.data on a thread, for the time ray.init spends waiting for Ray's
    processes to come up (1.2-1.8 s of the driver's time to its first results on a 2-core machine,
    measured). Join the thread, then `import ray.data` as usual: an import that failed on the
    thread raises there, with its own traceback."""
    import importlib

    for name in IMPORTED_BY_RAY_INIT_AND_RAY_DATA:
        importlib.import_module(name)

    def load():
        try:
            importlib.import_module("ray.data")
        except Exception:  # noqa: BLE001 - the caller's own import raises it again, where it is handled
            pass

    thread = threading.Thread(target=load, name="import ray.data", daemon=True)
    thread.start()
    return thread


def start_ray(address: str | None, object_store_memory: int | None) -> None:
    """ray.init as a run calls it: join `address` (or RAY_ADDRESS), else start a local Ray."""
    import ray

    init_kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, "include_dashboard": False,
                                   "object_store_memory": object_store_memory or None}
    raylogs.quiet_expected_log_messages()
    ray.init(**{k: v for k, v in init_kwargs.items() if v is not None})


def input_dataset(blocks: list[pa.Table]):
    """One wave's tables as a Ray dataset of as many blocks, in order."""
    import ray
    import ray.data

    from_blocks = getattr(ray.data, "from_blocks", None)  # a DeveloperAPI, not in every Ray 2.x
    if from_blocks is not None:
        return from_blocks(blocks)
    return ray.data.from_arrow_refs([ray.put(table) for table in blocks])


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
                 decode: dict | None = None, actors_per_gpu: int = 1, gpu_jpeg: dict | None = None):
        import torch

        from . import gpumem
        from .config import DetectorParams
        from .inference import FaceAnalyzer

        if torch_threads:
            models.set_cpu_threads(torch_threads)
        params = DetectorParams(
            min_face_size=detector_params["min_face_size"],
            thresholds=tuple(detector_params["thresholds"]),
            scale_factor=detector_params["scale_factor"],
        )
        self.embed = embed
        self.decode = decode
        # --gpu-jpeg-decode: {max_pixels, max_side}. Fails here, with the reason, where nvJPEG
        # cannot run (so the run stops at once instead of decoding on one CPU per actor).
        # (Passed-on JPEGs exist only in that mode; their CPU fallback decodes with its limits.)
        self.limits = gpu_jpeg or {"max_pixels": IndexConfig.max_pixels, "max_side": IndexConfig.max_side}
        self.jpeg_decoder = None
        if gpu_jpeg is not None:
            from .device_jpeg import DeviceJpegDecoder, nvjpeg_batch_decoder

            self.jpeg_decoder = DeviceJpegDecoder(nvjpeg_batch_decoder(device), **gpu_jpeg)
        budget = None
        if device == "cuda" and actors_per_gpu > 1 and not os.environ.get(gpumem.ENV_BUDGET):
            # The other actors on this GPU allocate too: plan for this actor's share of the card,
            # not for whatever happens to be free when a call starts.
            budget = gpumem.shared_budget(torch.cuda.get_device_properties(0).total_memory, actors_per_gpu)
        self.analyzer = FaceAnalyzer(device=device, detector_params=params, embed=embed, memory_budget_bytes=budget)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from . import gpumem
        from .inference import StageTimes

        die_once("FACEBATCH_FAULT_KILL_ACTOR_ONCE")
        if self.decode is not None:
            # CPU-only pools fetch and decode in the actor itself (see default_sizing).
            batch = fetch_and_decode(batch, **self.decode)

        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        t_decode = time.perf_counter()
        ok_idx, images, ok_scales, failed_here = batch_images(batch, status, errors, device_decoder=self.jpeg_decoder,
                                                              **self.limits)
        passed_on = batch.num_rows - batch.column("encoded").null_count
        decode_here_s = time.perf_counter() - t_decode if passed_on else 0.0
        if failed_here:  # a passed-on JPEG that no decoder could read: an error row like any other
            batch = _clear_image_facts(batch, failed_here)
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
        out = batch.drop_columns(["pixels", "encoded", "pix_h", "pix_w", "status", "error"])
        if decode_here_s:  # the passed-on JPEGs' decoding, charged to the decode stage
            decode_s = pc.add(out["decode_s"], pa.scalar(decode_here_s / max(1, batch.num_rows), pa.float32()))
            out = out.set_column(out.column_names.index("decode_s"), "decode_s", decode_s)
        out = out.append_column("status", pa.array(status, pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        out = out.append_column("num_faces", pa.array(num_faces, pa.int32()))
        out = out.append_column("faces", faces_array(results, batch.num_rows, ok_idx_final, self.embed))
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


def _clear_image_facts(batch: pa.Table, rows: list[int]) -> pa.Table:
    """width, height and format of `rows` set to null (they came from a header whose file then
    failed to decode; error rows carry none of them, as in reading._decode_one)."""
    mask = np.zeros(batch.num_rows, bool)
    mask[rows] = True
    for name in ("width", "height", "format"):
        column = batch[name]
        cleared = pc.if_else(pa.array(mask), pa.nulls(batch.num_rows, column.type), column)
        batch = batch.set_column(batch.column_names.index(name), name, cleared)
    return batch


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


def _abort_quietly(writer: RunWriter) -> None:
    """Delete a failed run's staged files; when storage is what failed, that may fail too, and then
    the next run's recovery discards them (they have no READY marker): the run's own error matters."""
    try:
        writer.abort()
    except storage.StorageError as exc:
        log.warning("could not delete the staged files of run %s (the next run discards them): %s", writer.run_id, exc)


def _abort_if_incomplete(writer: RunWriter) -> None:
    if writer.state == "open":
        _abort_quietly(writer)


def _count_fetch_errors(images_rows: pa.Table, counter: Counter) -> None:
    failed = images_rows.filter(pc.equal(images_rows["status"], "fetch_failed"))
    for uri, error in zip(failed["uri"].to_pylist(), failed["error"].to_pylist()):
        counter[(error or "").replace(uri, "<uri>")] += 1


def default_sizing(config: IndexConfig, resources: dict[str, float], can_add_nodes: bool = False,
                   nodes: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Pool and batch sizes from the cluster's resources, unless the config sets them.

    The actor pool starts at ``num_actors`` and may grow to ``max_actors`` (Ray Data's autoscaling
    actor pool): on a cluster that can add nodes, the pending actors are what makes the autoscaler
    add GPU workers, and idle ones are released so the nodes can go. ``can_add_nodes`` says the
    run joined an existing cluster (which may autoscale from zero GPUs); a Ray instance this
    process starts itself has only the GPUs it sees. ``nodes`` are the alive nodes' own resources
    (CPU actors are sized per node); without them ``resources`` counts as one node.
    """
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if use_gpu:
        if gpus < 1:
            if not can_add_nodes:
                raise RuntimeError(f"device {config.device!r} asks for GPUs but this Ray instance has none")
            log.warning("no GPU in the Ray cluster yet: the inference actors wait for the autoscaler to add GPU nodes")
        share = config.actors_per_gpu
        num_actors = config.num_actors or max(1, gpus) * share
        return {
            "device": "cuda",
            "num_actors": num_actors,
            "max_actors": max(num_actors, config.max_actors or num_actors),
            "num_gpus": 1 / share,
            "actors_per_gpu": share,
            "actor_cpus": 1,
            "torch_threads": None,
            "actor_memory": None,
            "batch_size": config.batch_size or 64,
            # Separate decode tasks keep the GPUs fed: everything but one CPU per actor decodes.
            "decode_in_actor": config.decode_tasks is False,
            "read_concurrency": config.read_concurrency or max(1, cpus - num_actors),
        }
    if config.gpu_jpeg_decode:
        raise ConfigError("--gpu-jpeg-decode needs CUDA inference actors, and this run's actors use the CPU "
                          "(no GPU in the Ray cluster, or --device cpu): drop the flag or run on GPU nodes")
    # CPU: no accelerator to keep fed, and separate decode tasks would only compete with torch's
    # threads for the same cores (measured: 1.9x the bare model time on 2 cores, against 1.2x
    # with decoding in the actor). So each actor owns its cores and fetches + decodes its batches
    # itself. Parallelism comes from actors rather than threads (see cpu_pool).
    decode_in_actor = config.decode_tasks is not True
    batch_size = config.batch_size or 16
    # With separate decode tasks (--decode-tasks), a quarter of the cores is left to them.
    read_cpus = 0 if decode_in_actor else max(1, cpus // 4)
    infer_cpus = max(1, cpus - read_cpus)
    actor_memory = None
    if config.num_actors:  # as given: the cores are shared among them
        num_actors, actor_cpus = config.num_actors, max(1, infer_cpus // config.num_actors)
    else:
        num_actors, actor_cpus, actor_memory = cpu_pool(
            nodes if nodes is not None else [resources], read_cpus,
            0 if decode_in_actor else (config.read_concurrency or read_cpus),
            cpu_actor_memory(batch_size, config.max_side), config.max_actors)
    # --max-actors alone caps the default pool; it grows beyond that only where nodes can be added.
    grows = config.num_actors is not None or can_add_nodes
    return {
        "device": "cpu",
        "num_actors": num_actors,
        "max_actors": max(num_actors, config.max_actors or num_actors) if grows else num_actors,
        "num_gpus": 0,
        "actors_per_gpu": 1,
        "actor_cpus": actor_cpus,
        "torch_threads": actor_cpus,
        "batch_size": batch_size,
        "decode_in_actor": decode_in_actor,
        "read_concurrency": None if decode_in_actor else (config.read_concurrency or read_cpus),
        "actor_memory": actor_memory,
    }


def cpu_pool(nodes: list[dict[str, float]], read_cpus: int, decode_tasks: int, actor_memory: int,
             max_actors: int | None) -> tuple[int, int, int | None]:
    """(actors, CPUs and torch threads each, memory each actor reserves) for CPU inference.

    One single-threaded actor per core where each node's memory holds them: torch's threads wait
    for each other at every operation, and an actor's fetch and decode are single-threaded, so
    actors use the cores better than threads do (measured on 2 cores: the 765-image corpus x5 in
    86 s of processing with two 1-thread actors against 124 s with one 2-thread actor). Where a
    node's memory (Ray's ``memory`` resource, less what its share of the ``decode_tasks`` reserves) holds
    fewer actors than it has cores, every actor gets more threads, so that on each node (Ray places
    actors by their CPUs) the actors that fit its cores also fit its memory. Nodes without CPUs (a
    KubeRay head) take no actor. Each actor reserves its estimated memory, so Ray keeps actors off
    a node too small for one; where no node is known to hold one, one actor runs and reserves
    nothing. ``max_actors`` alone caps the pool: fewer, wider actors."""
    cpu_nodes = [n for n in nodes if int(n.get("CPU", 0)) >= 1]
    if not cpu_nodes:
        return 1, 1, None
    total_cpus = sum(int(n["CPU"]) for n in cpu_nodes)
    infer_cpus = max(1, total_cpus - read_cpus)
    threads, known, fits_somewhere = 1, False, False
    for node in cpu_nodes:
        if node.get("memory") is None:
            continue
        known = True
        # This node's cores for inference (decode tasks take their share) and the actors its memory holds.
        cores = max(1, round(int(node["CPU"]) * infer_cpus / total_cpus))
        decode_share = decode_tasks * int(node["CPU"]) / total_cpus * DECODE_TASK_MEMORY
        fit = int(max(0.0, float(node["memory"]) - decode_share) // actor_memory)
        if fit >= 1:
            fits_somewhere = True
            # The fewest threads each for which the actors its cores take (cores // threads) fit.
            threads = max(threads, cores // (fit + 1) + 1)
    widest = max(int(n["CPU"]) for n in cpu_nodes)
    if known and not fits_somewhere:
        # No node is known to hold even one actor: one actor, on the largest node's cores.
        return 1, min(widest, infer_cpus), None
    reserve = actor_memory if known else None

    def placeable(width: int) -> int:
        nodes_hold = sum(int(n["CPU"]) // width for n in cpu_nodes
                         if reserve is None or float(n.get("memory") or 0) >= reserve)
        return min(nodes_hold, infer_cpus // width)

    if max_actors:
        while threads < widest and placeable(threads + 1) >= max_actors:
            threads += 1
    num_actors = max(1, placeable(threads))
    if max_actors:
        num_actors = min(num_actors, max_actors)
    return num_actors, threads, reserve


def initial_pool_size(sizing: dict[str, Any], wave: int, cluster_gpus: float) -> int:
    """How many inference actors a wave starts with. A pool that may autoscale starts the second
    and later waves at the size the cluster's GPUs allow (within its min and max), not back at the
    minimum: the previous wave's actors are gone, but the nodes it scaled up to are still there."""
    low, high = sizing["num_actors"], sizing["max_actors"]
    if wave > 1 and high > low and sizing["device"] == "cuda":
        return min(high, max(low, int(cluster_gpus) * sizing["actors_per_gpu"]))
    return low


def sizing_for_batches(sizing: dict[str, Any], batches: int) -> dict[str, Any]:
    """The pool for a wave of this many batches: never more actors than batches. Each input block is
    one actor call, so a further actor would only start (import torch, load the models, reserve its
    memory) and wait; and on an autoscaling cluster each pending GPU actor can bring up a node, which
    a nightly run of a few new photos must not pay for."""
    cap = max(1, batches)
    if sizing["num_actors"] <= cap and sizing["max_actors"] <= cap:
        return sizing
    return {**sizing, "num_actors": min(sizing["num_actors"], cap), "max_actors": min(sizing["max_actors"], cap)}


def _inference_dataset(ds, config: IndexConfig, sizing: dict[str, Any], endpoint: str | None, wave: int = 1):
    """A wave's input dataset through decoding (where separate tasks decode) and the inference actors."""
    import ray
    import ray.data

    pool = {"min_size": sizing["num_actors"], "max_size": sizing["max_actors"]}
    initial = initial_pool_size(sizing, wave, ray.cluster_resources().get("GPU", 0))
    # (ActorPoolStrategy has initial_size since Ray 2.5x; with an older Ray every wave starts at the minimum.)
    if initial != pool["min_size"] and "initial_size" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        pool["initial_size"] = initial
    decode_kwargs = {"retries": config.fetch_retries, "endpoint": endpoint, "max_pixels": config.max_pixels,
                     "max_side": config.max_side, "jpeg_passthrough": config.gpu_jpeg_decode}
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
        # Fetching and decoding in the actor, each input block is one call (Ray Data would
        # otherwise bundle the small first block with the next one); after decode tasks,
        # their small output blocks are bundled up to the batch size.
        batch_size=None if sizing["decode_in_actor"] else sizing["batch_size"],
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
            "actors_per_gpu": sizing["actors_per_gpu"],
            "gpu_jpeg": ({"max_pixels": config.max_pixels, "max_side": config.max_side}
                         if config.gpu_jpeg_decode else None),
        },
        # Ray Data restarts a lost actor and retries its batch (and retries lost read tasks)
        # by default, so a killed worker or a lost node costs time, not rows.
        # min = max is a fixed pool; a larger max lets it autoscale with the cluster.
        compute=ray.data.ActorPoolStrategy(**pool),
        num_cpus=sizing["actor_cpus"],
        num_gpus=sizing["num_gpus"],
        **({"memory": sizing["actor_memory"]} if sizing.get("actor_memory") else {}),
    )
    return ds


def run_index(config: IndexConfig, ray_address: str | None = None, object_store_memory: int | None = None,
              progress: bool = True, on_batch: Callable[[int, int, float], None] | None = None) -> RunSummary:
    """Plan, run and publish one indexing run. Raises on failure of the run itself (not of single objects)."""
    before = active_heartbeats()
    with contextlib.ExitStack() as on_exit:  # local clean-up (the plan's spill files), failed or not
        try:
            return _run_index(config, ray_address, object_store_memory, progress, on_batch, on_exit)
        except BaseException:
            # A failed run stops beating, so that the next run (from this long-lived process or
            # another machine) may finish or discard what it staged.
            for heartbeat in active_heartbeats() - before:
                heartbeat.stop()
            raise


def _run_index(config: IndexConfig, ray_address: str | None, object_store_memory: int | None,
               progress: bool, on_batch: Callable[[int, int, float], None] | None,
               on_exit: contextlib.ExitStack) -> RunSummary:
    import ray

    from .plan import build_plan

    config.validate()
    t_start = time.perf_counter()
    endpoint = config.s3_endpoint_url()
    # OUT's filesystem and layout, made once: everything below (recovery, planning, writing,
    # publishing, the lease) works through it.
    out = Out.from_uri(config.out, endpoint)
    run_id = config.run_id or new_run_id()

    # One writer per OUT: a second `index`, `compact` or `people` on it stops here (LeaseHeld, exit 2).
    from .lease import Lease

    lease = on_exit.enter_context(Lease(out, holder=f"facebatch index run {run_id}"))
    recovered = recover_staging(out)
    for action in recovered:
        log.warning("previous run %s was interrupted: %s", action["run_id"], action["action"])

    # Model hashes (and so the pipeline version) come from the files, before any cluster work.
    model_hashes = models.model_hashes(embed=config.embed)
    version = pipeline_version(model_hashes, config)

    t0 = time.perf_counter()
    plan = build_plan(config, version, out)
    on_exit.callback(plan.cleanup)
    plan_s = time.perf_counter() - t0
    todo = plan.num_todo
    log.info("plan: %s -> %d to process (%s)", config.source, todo, plan.counts)

    joined_cluster = bool(ray_address or os.environ.get("RAY_ADDRESS"))
    loading_ray_data = import_ray_data_alongside() if "ray.data" not in sys.modules else None
    if loading_ray_data is not None:
        # Also where ray.init fails: the run ends with the import finished, not cut off mid-module.
        on_exit.callback(loading_ray_data.join)
    if not ray.is_initialized():
        start_ray(ray_address, object_store_memory if not joined_cluster else None)
    # After ray.init: the processes Ray starts must not inherit the filter's pipe.
    on_exit.callback(raylogs.StderrLineFilter().close)
    sizing = default_sizing(config, ray.cluster_resources(), can_add_nodes=joined_cluster,
                            nodes=[node["Resources"] for node in ray.nodes() if node.get("Alive")])

    if loading_ray_data is not None:
        loading_ray_data.join()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # keeps output sorted by image_id, as the plan is
    ctx.enable_progress_bars = progress and sys.stderr.isatty()

    indexed_at = datetime.now(timezone.utc)
    writer = RunWriter(out, run_id, row_group_size=config.rows_per_row_group)
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
    waves = 0  # datasets of at most WAVE_BLOCKS input blocks, one after the other
    if todo:
        # One input block per inference batch: Ray Data hands an actor (and a decode task) a whole
        # input block per call, so big blocks would serialise the pool and, with preserve_order,
        # hold every result back until the block is done.
        # The first block is a quarter batch: its results come back after a few images, which is
        # when a user (and a nightly's log) first sees the run working.
        last_log = time.perf_counter()
        first_rows = max(1, sizing["batch_size"] // 4)
        total_waves = -(-input_blocks(todo, sizing["batch_size"], first_rows) // WAVE_BLOCKS)
        for blocks in input_waves(plan, rows=sizing["batch_size"], first_rows=first_rows):
            waves += 1
            if total_waves > 1:
                log.info("input wave %d/%d: %d batches", waves, total_waves, len(blocks))
            ds = _inference_dataset(input_dataset(blocks), config, sizing_for_batches(sizing, len(blocks)), endpoint,
                                    wave=waves)
            del blocks  # the dataset holds them now
            # No prefetch: Ray Data's executor runs ahead on its own, and a prefetching iterator holds
            # the first results back until more batches are done (measured: +7 s to the first
            # results of the 153-photo run on 2 cores).
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
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
                fault_point("write-after-first-batch")
                now = time.perf_counter()
                if on_batch is not None:  # (images processed, faces, seconds since processing began)
                    on_batch(processed, faces_total, now - t_infer)
                if now - last_log > 10 or processed == todo:
                    rate = processed / max(1e-9, now - t_infer)
                    log.info("progress: %d/%d images (%.1f%%), %d faces, %.1f images/s", processed, todo,
                             100.0 * processed / todo, faces_total, rate)
                    last_log = now
            # Before the next wave is read and put: this wave's blocks go with its dataset.
            ds = batch = images_rows = faces_rows = None
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
        "input_waves": waves,
        # After the first results arrive (start-up excluded): what a long run converges to.
        "first_results_s": first_batch_s,
        "steady_images_per_second": (todo - first_batch_rows) / (process_s - first_batch_s)
        if first_batch_s is not None and todo > first_batch_rows and process_s > first_batch_s else None,
        "sizing": sizing,
        "config": config.to_json(),
        "models": {name: {"sha256": sha} for name, sha in model_hashes.items()},
        "recovered_runs": recovered,
    }
    # What publishing must remove from older files: the rows this run replaces (never new objects,
    # which no older file holds) and, with --prune, the ids of objects gone from SOURCE.
    stage_replaced_ids(plan, version, out, run_id)
    if plan.deleted_ids_path:
        stage_pruned_ids(plan.deleted_ids_path, out, run_id)
    fault_point("staged-before-record")
    out.write_json(out.staged_record(run_id), record)
    fault_point("staged-after-record")
    lease.check()  # taken over while this run was cut off: the other writer's recovery publishes it
    publish_run(out, run_id, record, heartbeat=writer.heartbeat)
    return RunSummary(run_id=run_id, pipeline_version=version, out=config.out, record=record)
