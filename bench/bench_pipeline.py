"""End-to-end throughput of `facebatch index` against the bare models on the same images.

1. bare: the images decoded in advance (not timed), then FaceAnalyzer (detector + alignment +
   embedder) over them in batches, on 2 torch threads: the models' own time; and the same with
   one single-threaded process per core, each on its share of the images (the pipeline's CPU
   actors run so by default);
2. end to end: `run_index` over the same files on a local Ray instance (plan, fetch, decode,
   inference, Parquet write, publish), from a local folder or from a loopback S3 server.
Prints images/s, the stage breakdown from the run record, the ratio end-to-end / bare, the
peak memory (driver + Ray workers, sampled every 0.5 s), and where the CPU went: the CPU seconds
of the driver, the inference actors, Ray Data's helper actors and Ray's daemons from the command's
start to its first and to its last results, next to the wall time times the cores.

    .venv/bin/python bench/bench_pipeline.py                      # shared detection + identity images
    .venv/bin/python bench/bench_pipeline.py --source s3          # the same through moto_server
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

import benchlib

CORPUS = benchlib.SHARED / "faces"


class MemorySampler:
    """Peak and time series of the summed RSS of this process and its children (Ray workers)."""

    def __init__(self, interval: float = 0.5, exclude_pids: tuple[int, ...] = ()):
        self.interval, self.exclude = interval, set(exclude_pids)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid in self.exclude:
                continue
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter() - self._t0, self.rss_mb()))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max((m for _, m in self.samples), default=0.0)


#: Whose CPU time it is, by command line (first match wins); the rest of the driver's process tree is
#: "other Ray workers" (idle pool workers), the driver itself "driver".
PROCESS_GROUPS = (
    ("inference actors", ("MapWorker",)),
    ("Ray Data's helper actors", ("_StatsActor", "AutoscalingCoordinator", "ActorLocationTracker")),
    ("Ray's daemons", ("gcs_server", "raylet", "dashboard", "DashboardAgent", "RuntimeEnvAgent", "log_monitor",
                       "monitor.py", "runtime_env")),
)


class CpuAccount:
    """CPU seconds of the driver and each group of its descendants (Ray's processes), taken at
    named moments: which processes the cores went to before the first results and over the run.
    The process tree is also sampled in the background, so that a process that has ended (an
    actor Ray Data let go before the last results reached the driver) keeps its last seen time."""

    def __init__(self, exclude_pids: tuple[int, ...] = (), interval: float = 0.25):
        self.exclude = set(exclude_pids)
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (group when last seen, CPU seconds)
        self.snapshots: dict[str, tuple[float, dict[str, float]]] = {}
        self._lock = threading.Lock()
        self.take("start")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def group_of(proc: psutil.Process, me: int) -> str:
        if proc.pid == me:
            return "driver"
        command = " ".join(proc.cmdline())
        for name, needles in PROCESS_GROUPS:
            if any(needle in command for needle in needles):
                return name
        return "other Ray workers"

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid in self.exclude:
                continue
            try:
                cpu = proc.cpu_times()
                group = self.group_of(proc, me.pid)
            except psutil.Error:  # ended meanwhile
                continue
            with self._lock:
                self.seen[proc.pid] = (group, cpu.user + cpu.system)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def take(self, moment: str) -> None:
        self._sample()
        groups: dict[str, float] = {}
        with self._lock:
            for group, cpu in self.seen.values():
                groups[group] = groups.get(group, 0.0) + cpu
        self.snapshots[moment] = (time.perf_counter(), groups)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def table(self) -> list[str]:
        """One line per group: CPU seconds from the start to each later moment."""
        t0, start = self.snapshots["start"]
        moments = [m for m in self.snapshots if m != "start"]
        names = ["driver", *(name for name, _ in PROCESS_GROUPS), "other Ray workers"]
        lines = [f"{'CPU seconds from the command start to':34s} " + " ".join(f"{m:>16s}" for m in moments),
                 f"{'  wall seconds x cores':34s} " + " ".join(
                     f"{(self.snapshots[m][0] - t0) * (os.cpu_count() or 1):16.1f}" for m in moments)]
        for name in names:
            used = [self.snapshots[m][1].get(name, 0.0) - start.get(name, 0.0) for m in moments]
            lines.append(f"{'  ' + name:34s} " + " ".join(f"{u:16.1f}" for u in used))
        return lines


def corpus_files(limit: int | None) -> list[Path]:
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    files = [CORPUS / e["path"] for e in manifest["files"]
             if e["set"] in ("detection", "identity") and e.get("kind") == "image" and not (e.get("image") or {}).get("undecodable")]
    return files[:limit] if limit else files


def bare_models(files: list[Path], batch_size: int, max_side: int, threads: int = 2, ready=None) -> dict:
    import torch

    from facebatch.decode import decode_image
    from facebatch.inference import FaceAnalyzer, StageTimes

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    analyzer = FaceAnalyzer(device="cpu")
    load_s = time.perf_counter() - t0
    decoded = [decode_image(p.read_bytes(), max_side=max_side) for p in files]
    for _ in range(2):  # warm-up: the detector's second call sets up its compiled samplers
        analyzer.analyze([decoded[0].rgb], [decoded[0].scale])
    if ready is not None:
        ready.wait()  # all processes start timing together
    times = StageTimes()
    t0 = time.perf_counter()
    faces = 0
    for i in range(0, len(decoded), batch_size):
        chunk = decoded[i : i + batch_size]
        faces += sum(len(r) for r in analyzer.analyze([d.rgb for d in chunk], [d.scale for d in chunk], times))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "faces": faces, "load_s": load_s, "detect_s": times.detect_s, "embed_s": times.embed_s}


def _bare_share(args) -> dict:
    files, batch_size, max_side, ready = args
    return bare_models(files, batch_size, max_side, threads=1, ready=ready)


def bare_models_per_core(files: list[Path], batch_size: int, max_side: int) -> dict:
    """The same models in one single-threaded process per core (as the pipeline's CPU actors run
    by default), each on its share of the images, timed from a common start to the last finish."""
    import multiprocessing

    cores = min(os.cpu_count() or 1, len(files))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        ready = manager.Barrier(cores + 1)
        with context.Pool(cores) as pool:
            pending = pool.map_async(_bare_share, [(files[i::cores], batch_size, max_side, ready) for i in range(cores)])
            ready.wait()
            t0 = time.perf_counter()
            shares = pending.get()
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "faces": sum(s["faces"] for s in shares), "processes": cores}


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--source", choices=("local", "s3"), default="local")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-side", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=1,
                        help="index the corpus this many times over (copies under other names), so start-up weighs less")
    parser.add_argument("--num-actors", type=int, help="inference actors (default: the pipeline's, one per core on CPU where memory allows)")
    parser.add_argument("--max-actors", type=int, help="let the pool grow up to this many actors")
    parser.add_argument("--skip-bare", action="store_true", help="time only the end-to-end run")
    args = parser.parse_args()
    if not CORPUS.is_dir():
        sys.exit(f"shared corpus not found at {CORPUS}")
    files = corpus_files(args.limit) * args.repeat
    work = Path(tempfile.mkdtemp(prefix="facebatch-bench-pipeline-"))
    archive = work / "archive"
    keys = [f"copy{i // (len(files) // args.repeat)}/{p.relative_to(CORPUS)}" for i, p in enumerate(files)]
    for path, key in zip(files, keys):
        dest = archive / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)

    nan = float("nan")
    bare = (bare_models(files, args.batch_size, args.max_side) if not args.skip_bare
            else {"seconds": nan, "faces": None, "load_s": nan, "detect_s": nan, "embed_s": nan})
    per_core = (bare_models_per_core(files, args.batch_size, args.max_side) if not args.skip_bare
                else {"seconds": nan, "faces": None, "processes": os.cpu_count()})

    with contextlib.ExitStack() as stack:
        source, out = str(archive), str(work / "tables")
        exclude: tuple[int, ...] = ()
        if args.source == "s3":
            server = stack.enter_context(benchlib.s3_server(work, "bench"))
            client = server.client()
            for path, key in zip(files, keys):
                client.put_object(Bucket="bench", Key=f"photos/{key}", Body=path.read_bytes())
            source, out = "s3://bench/photos", "s3://bench/tables"
            exclude = (server.process.pid,)
        summary, wall, peak, cpu = run_and_sample(source, out, args, exclude)
    record = summary.record
    sec = record["seconds"]
    n = len(files)
    print(f"{n} images ({args.source}, corpus x{args.repeat}), batch {args.batch_size}, max_side {args.max_side}, torch threads 2, {os.cpu_count()} CPUs")
    print(f"{'':34s} {'seconds':>9s} {'images/s':>9s}")
    print(f"{'bare models (detect+align+embed)':34s} {bare['seconds']:9.2f} {n / bare['seconds']:9.2f}")
    print(f"{'  of which detect / embed':34s} {bare['detect_s']:9.2f} / {bare['embed_s']:.2f}")
    label = f"bare, {per_core['processes']} processes x 1 thread"
    print(f"{label:34s} {per_core['seconds']:9.2f} {n / per_core['seconds']:9.2f}")
    print(f"{'end to end: processing':34s} {sec['process']:9.2f} {n / sec['process']:9.2f}")
    print(f"{'end to end: whole command':34s} {wall:9.2f} {n / wall:9.2f}  (plan {sec['plan']:.2f} s, Ray start + model load included)")
    steady = record.get("steady_images_per_second")
    if steady:
        print(f"{'end to end: after first results':34s} {'':9s} {steady:9.2f}  (first results after {record['first_results_s']:.2f} s)")
    print(f"{'ratio processing / bare':34s} {sec['process'] / bare['seconds']:9.2f}")
    print(f"{'ratio processing / bare per core':34s} {sec['process'] / per_core['seconds']:9.2f}")
    if steady:
        print(f"{'ratio after first results / bare':34s} {(n / bare['seconds']) / steady:9.2f}")
    print("stage seconds summed over workers: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items() if k.endswith("_cpu_sum")))
    print(f"faces: bare {bare['faces']}, bare per core {per_core['faces']}, end to end {record['faces']}; "
          f"statuses {record['images_by_status']}")
    print(f"peak RSS driver + Ray workers: {peak:.0f} MiB; model load {bare['load_s']:.2f} s")
    print("\n".join(cpu.table()))
    shutil.rmtree(work, ignore_errors=True)


def run_and_sample(source: str, out: str, args, exclude: tuple[int, ...]):
    """The end-to-end run; its summary, wall seconds and the peak memory of the driver and the Ray workers."""
    from facebatch.config import IndexConfig
    from facebatch.pipeline import run_index

    sampler = MemorySampler(exclude_pids=exclude)
    cpu = CpuAccount(exclude_pids=exclude)
    t0 = time.perf_counter()
    config = IndexConfig(source=source, out=out, batch_size=args.batch_size, max_side=args.max_side,
                         num_actors=args.num_actors, max_actors=args.max_actors)

    def on_batch(processed: int, faces: int, seconds: float) -> None:
        # The last batch's snapshot comes before the run ends its actors (their time would go with them).
        cpu.take("first results" if "first results" not in cpu.snapshots else "last results")

    summary = run_index(config.validate(),
                        object_store_memory=512 * 2**20, progress=False, on_batch=on_batch)
    wall = time.perf_counter() - t0
    cpu.stop()
    return summary, wall, sampler.stop(), cpu


if __name__ == "__main__":
    main()
