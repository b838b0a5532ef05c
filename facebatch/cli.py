"""The `facebatch` command: detect, index, demo, compact, people, search."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Sequence

from .config import ConfigError, DetectorParams, IndexConfig, positive_int
from .storage import StorageError
from .summaries import format_people_summary, format_summary


def _add_option(container, f: dataclasses.Field) -> None:
    """The command-line option of one config field, from its metadata (config.cli_option)."""
    spec = f.metadata["cli"]
    if spec["positional"]:
        container.add_argument(f.name, help=spec["help"])
        return
    kwargs: dict = {"dest": f.name, "help": spec["help"]}
    if spec["required"]:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default
    if spec["action"] is not None:
        kwargs["action"] = spec["action"]
    if spec["parse"] is not None:
        kwargs["type"] = spec["parse"]
    container.add_argument(spec["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def _option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def add_detector_options(parser: argparse.ArgumentParser):
    """The detector's options (DetectorParams' fields, and the device), in their own help group."""
    group = parser.add_argument_group("detector")
    for f in _option_fields(DetectorParams) + [f for f in _option_fields(IndexConfig) if f.metadata["cli"]["group"] == "detector"]:
        _add_option(group, f)
    return group


def add_index_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `facebatch index` and jobs/index_archive.py (the `ray job submit` entrypoint):
    one per IndexConfig field (config.py declares each with its default and help), plus where Ray runs."""
    groups = {None: parser}
    for f in _option_fields(IndexConfig):
        if f.metadata["cli"]["group"] is None:
            _add_option(parser, f)  # SOURCE and --out, first
    groups["detector"] = add_detector_options(parser)
    for name in ("decoding", "ray", "incremental"):
        groups[name] = parser.add_argument_group(name)
    for names in (("decoding", "ray"), ("incremental",)):
        for f in _option_fields(IndexConfig):
            if f.metadata["cli"]["group"] in names:
                _add_option(groups[f.metadata["cli"]["group"]], f)
        if "ray" in names:
            # Where the run happens, not what it computes: not part of the config.
            groups["ray"].add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, or a local Ray instance)")
            groups["ray"].add_argument("--object-store-memory", type=positive_int,
                                       help="object store bytes when starting a local Ray instance")


def detector_params_from_args(args: argparse.Namespace) -> DetectorParams:
    return DetectorParams(**{f.name: getattr(args, f.name) for f in _option_fields(DetectorParams)})


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    values = {f.name: getattr(args, f.name) for f in _option_fields(IndexConfig)}
    return IndexConfig(detector=detector_params_from_args(args), **values).validate()


def run_index_command(args: argparse.Namespace) -> int:
    from .pipeline import RunFailed, run_index

    config = config_from_args(args)
    try:
        summary = run_index(config, ray_address=args.ray_address, object_store_memory=args.object_store_memory)
    except RunFailed as exc:
        print(f"facebatch index: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary.record))
    return 0


class FileDetector:
    """Reads, decodes and analyses image files a batch at a time, for `facebatch detect`: in the
    command's own process, or in each of its worker processes."""

    def __init__(self, device: str, detector_params: dict, embed: bool, threads: int | None,
                 max_pixels: int, max_side: int | None):
        from .inference import FaceAnalyzer
        from .models import set_cpu_threads

        if threads:
            set_cpu_threads(threads)
        self.analyzer = FaceAnalyzer(device=device, detector_params=DetectorParams(**detector_params), embed=embed)
        self.max_pixels, self.max_side = max_pixels, max_side

    def __call__(self, paths: list[str]) -> list[dict]:
        """One JSON-ready entry per path, in order; a file that cannot be read or decoded gets its error."""
        from .decode import DecodeError, decode_image

        entries: list[dict] = []
        images = []
        for path in paths:
            entry = {"path": path, "width": None, "height": None, "faces": [], "error": None}
            entries.append(entry)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
                img = decode_image(data, max_pixels=self.max_pixels, max_side=self.max_side)
            except DecodeError as exc:
                entry["error"] = f"{exc.status}: {exc.message}"
                continue
            except OSError as exc:
                entry["error"] = f"unreadable: {exc.strerror or exc}"
                continue
            entry["width"], entry["height"] = img.width, img.height
            images.append((entry, img))
        if images:
            results = self.analyzer.analyze([img.rgb for _, img in images], [img.scale for _, img in images])
            for (entry, _), res in zip(images, results):
                for k in range(len(res)):
                    face = {
                        "box": [round(float(v), 2) for v in res.boxes[k]],
                        "score": round(float(res.scores[k]), 6),
                        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in res.landmarks[k]],
                    }
                    if res.embeddings is not None:
                        face["embedding"] = [round(float(v), 6) for v in res.embeddings[k]]
                    entry["faces"].append(face)
        return entries


_WORKER_DETECTOR: FileDetector | None = None


def _start_detect_worker(kwargs: dict) -> None:
    global _WORKER_DETECTOR
    _WORKER_DETECTOR = FileDetector(**kwargs)


def _detect_in_worker(paths: list[str]) -> list[dict]:
    return _WORKER_DETECTOR(paths)


def detect_workers(args: argparse.Namespace, batches: int) -> int:
    """How many processes `detect` runs: --workers, else on CPU one single-threaded process per
    core (torch's threads wait for each other at every operation, and decoding is single-threaded:
    processes use the cores better), but no more than there are batches, and none besides the
    command's own for a single batch or when --threads or a GPU is asked for."""
    if args.workers:
        return min(args.workers, max(1, batches))
    if args.threads or args.device not in ("cpu", "auto") or batches < 2:
        return 1
    # "auto" means CUDA where there is a GPU; without an NVIDIA driver there is none, and then this
    # process need not import torch (2-3 CPU-seconds the workers would wait for) to find out.
    if args.device == "auto" and os.path.exists("/proc/driver/nvidia/version"):
        import torch

        if torch.cuda.is_available():
            return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, batches)


def run_detect_command(args: argparse.Namespace) -> int:
    params = detector_params_from_args(args)
    params.validate()
    batches = [args.paths[i : i + args.batch_size] for i in range(0, len(args.paths), args.batch_size)]
    workers = detect_workers(args, len(batches))
    if workers > 1:
        # Smaller batches (at least 4 per worker) keep the workers evenly loaded to the end: the
        # batch size barely changes the detector's speed, a last worker busy alone does.
        size = max(1, min(args.batch_size, -(-len(args.paths) // (4 * workers))))
        batches = [args.paths[i : i + size] for i in range(0, len(args.paths), size)]
    threads = args.threads or (1 if workers > 1 else None)
    detector_kwargs = {"device": args.device, "detector_params": dataclasses.asdict(params), "embed": args.embed,
                       "threads": threads, "max_pixels": args.max_pixels, "max_side": args.max_side}
    answered = 0  # files that decoded as images (whatever faces they hold)

    def emit(entries: list[dict]) -> None:
        nonlocal answered
        for entry in entries:
            sys.stdout.write(json.dumps(entry) + "\n")
            answered += entry["error"] is None
        sys.stdout.flush()

    if workers == 1:
        detector = FileDetector(**detector_kwargs)
        for batch in batches:
            emit(detector(batch))
    else:
        import concurrent.futures
        import multiprocessing

        # Spawned, not forked: a forked child would inherit torch's thread pools half set up.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_detect_worker,
                                                    initargs=(detector_kwargs,)) as pool:
            try:
                for entries in pool.map(_detect_in_worker, batches):  # in the files' order
                    emit(entries)
            except concurrent.futures.process.BrokenProcessPool as exc:
                print(f"facebatch detect: a worker process died ({exc}); if the system killed it for memory, "
                      f"use fewer --workers or a smaller --batch-size / --max-side", file=sys.stderr)
                return 1
    if not answered:
        print(f"facebatch detect: none of the {len(args.paths)} input(s) could be read as an image", file=sys.stderr)
        return 1
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, object_store_memory=args.object_store_memory)


def run_compact_command(args: argparse.Namespace) -> int:
    from .compact import compact
    from .out import Out

    result = compact(Out.from_uri(args.out, args.s3_endpoint), target_rows=args.target_rows)
    print(json.dumps(result, indent=2))
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def add_people_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `facebatch people` and jobs/cluster_people.py (the `ray job submit` entrypoint)."""
    from .people import PeopleConfig, QualityFilter

    defaults, quality = PeopleConfig(out="-"), QualityFilter()
    parser.add_argument("out", help="the index root given to `facebatch index --out` (local directory or s3://bucket/prefix)")
    parser.add_argument("--pipeline-version", help="cluster the faces of this pipeline version (default: the newest in OUT)")
    parser.add_argument("--full", action="store_true", help="recluster every face instead of placing only the new ones; old person ids are kept by largest overlap")
    parser.add_argument("--labels", help="CSV or Parquet (local or s3://) with image_id, face_index, name: names seed persons")
    group = parser.add_argument_group("clustering")
    group.add_argument("--threshold", type=_fraction, default=defaults.threshold, help="same-person cosine similarity (default %(default)s)")
    group.add_argument("--k", type=positive_int, default=defaults.k, help="neighbours per face in the kNN graph (default %(default)s)")
    group.add_argument("--min-size", type=positive_int, default=defaults.min_size, help="smallest unlabelled cluster that becomes a person (default %(default)s)")
    group.add_argument("--knn", choices=["auto", "local", "ray"], default=defaults.knn,
                       help="build the kNN graph in this process or in Ray tasks (default auto: Ray on a cluster or above 200,000 faces)")
    group = parser.add_argument_group("quality filter (filtered faces stay searchable)")
    group.add_argument("--min-score", type=_fraction, default=quality.min_score, help="detection score (default %(default)s)")
    group.add_argument("--min-face-size", type=_fraction, default=quality.min_face_size, help="shorter box side in pixels (default %(default)s)")
    group.add_argument("--max-abs-yaw", type=_fraction, default=quality.max_abs_yaw, help="yaw proxy, 0 frontal .. 1 profile (default %(default)s)")
    group.add_argument("--min-sharpness", type=_fraction, default=quality.min_sharpness, help="variance of the Laplacian of the chip (default %(default)s)")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--ray-address", help="Ray cluster address for --knn ray (default: RAY_ADDRESS, or a local Ray instance)")
    parser.add_argument("--run-id", help="explicit run id (default: people-<UTC timestamp>-<random>)")


def people_config_from_args(args: argparse.Namespace):
    from .people import PeopleConfig, QualityFilter

    return PeopleConfig(
        out=args.out,
        pipeline_version=args.pipeline_version,
        full=args.full,
        labels=args.labels,
        threshold=args.threshold,
        k=args.k,
        min_size=args.min_size,
        knn=args.knn,
        quality=QualityFilter(min_score=args.min_score, min_face_size=args.min_face_size,
                              max_abs_yaw=args.max_abs_yaw, min_sharpness=args.min_sharpness),
        s3_endpoint=args.s3_endpoint,
        run_id=args.run_id,
    ).validate()


def run_people_command(args: argparse.Namespace) -> int:
    from .people import run_people

    config = people_config_from_args(args)
    summary = run_people(config, ray_address=args.ray_address)
    print(format_people_summary(summary.record))
    return 0


def run_search_command(args: argparse.Namespace) -> int:
    import torch

    from .config import IndexConfig, pipeline_version
    from .decode import DecodeError, decode_image
    from .embedder import COSINE_THRESHOLD
    from .inference import FaceAnalyzer
    from .models import model_hashes
    from .people import SearchIndex, persons_of

    if args.threads:
        torch.set_num_threads(args.threads)
    index = SearchIndex.load(args.index, args.pipeline_version, args.s3_endpoint)
    defaults = IndexConfig(source="-", out=args.index)
    ours = pipeline_version(model_hashes(embed=True), defaults)
    if index.version != ours:
        raise ConfigError(
            f"the search index at {args.index} is for pipeline version {index.version}, but this facebatch embeds query "
            f"photos as pipeline version {ours} (other models, parameters or code): index the archive with this version "
            "and run `facebatch people` again"
        )
    analyzer = FaceAnalyzer(device=args.device, detector_params=defaults.detector, embed=True)
    answered = 0
    for path in args.photos:
        try:
            if path.startswith(("s3://", "s3a://")):
                from .storage import FetchError, fetch_bytes

                try:
                    data = fetch_bytes(path, endpoint=args.s3_endpoint)
                except FetchError as exc:
                    raise OSError(str(exc)) from exc
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
            img = decode_image(data, max_pixels=defaults.max_pixels, max_side=defaults.max_side)
        except DecodeError as exc:
            _search_line(args, {"path": path, "error": f"{exc.status}: {exc.message}", "faces": []})
            continue
        except OSError as exc:
            _search_line(args, {"path": path, "error": f"unreadable: {exc.strerror or exc}", "faces": []})
            continue
        result = analyzer.analyze([img.rgb], [img.scale])[0]
        matches = index.query(result.embeddings, top_k=args.top_k, min_similarity=args.min_similarity)
        faces = []
        for k in range(len(result)):
            faces.append({
                "face_index": k,
                "box": [round(float(v), 2) for v in result.boxes[k]],
                "score": round(float(result.scores[k]), 6),
                "matches": matches[k],
                "persons": persons_of(matches[k], COSINE_THRESHOLD),
            })
        _search_line(args, {"path": path, "error": None, "faces": faces})
        answered += 1
    return 0 if answered else 1


def _search_line(args: argparse.Namespace, entry: dict) -> None:
    if args.json:
        sys.stdout.write(json.dumps(entry) + "\n")
    elif entry["error"]:
        sys.stdout.write(f"{entry['path']}: error: {entry['error']}\n")
    elif not entry["faces"]:
        sys.stdout.write(f"{entry['path']}: no face found\n")
    else:
        for face in entry["faces"]:
            who = ", ".join(f"{p['name'] or p['person_id']} ({p['similarity']:.3f})" for p in face["persons"]) or "nobody known"
            sys.stdout.write(f"{entry['path']} face {face['face_index']}: {who}\n")
            for m in face["matches"]:
                sys.stdout.write(f"    {m['similarity']:.3f}  {m['image_id']}#{m['face_index']}  {m['name'] or m['person_id'] or '-'}\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facebatch", description="Find and fingerprint every face in a photo archive.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    detect = sub.add_parser("detect", help="detect faces in image files and print one JSON object per file")
    detect.add_argument("paths", nargs="+")
    detect.add_argument("--json", action="store_true", help="JSON lines output (the only format; accepted for clarity)")
    detect.add_argument("--embed", action="store_true", help="add a 128-d L2-normalised embedding to every face")
    detect.add_argument("--batch-size", type=positive_int, default=8)
    detect.add_argument("--max-pixels", type=positive_int, default=100_000_000)
    detect.add_argument("--max-side", type=positive_int, default=None, help="decode at most this long side (default: full resolution)")
    detect.add_argument("--threads", type=positive_int, help="torch CPU threads (per worker process)")
    detect.add_argument("--workers", type=positive_int,
                        help="worker processes, each reading, decoding and analysing whole batches (default on CPU: "
                             "one single-threaded process per core, as many as there are batches; 1 with --threads or a GPU)")
    add_detector_options(detect)
    detect.set_defaults(func=run_detect_command)

    index = sub.add_parser("index", help="index an archive into Parquet tables (runs on Ray)")
    add_index_options(index)
    index.set_defaults(func=run_index_command)

    demo = sub.add_parser("demo", help="build a small demo archive and index it on a local Ray instance")
    demo.add_argument("--out", default="demo-out", help="where to put the demo archive and tables (default %(default)s)")
    demo.add_argument("--object-store-memory", type=positive_int, default=512 * 1024 * 1024)
    demo.set_defaults(func=run_demo_command)

    compact = sub.add_parser("compact", help="merge a table's many small files into large files sorted by image_id")
    compact.add_argument("out", help="output root given to `facebatch index --out`")
    compact.add_argument("--target-rows", type=positive_int, default=2_000_000, help="rows per output file (default %(default)s)")
    compact.add_argument("--s3-endpoint")
    compact.set_defaults(func=run_compact_command)

    people = sub.add_parser("people", help="group the indexed faces into persons (incremental; publishes people, face_people and a search index)")
    add_people_options(people)
    people.set_defaults(func=run_people_command)

    search = sub.add_parser("search", help="find the indexed faces and persons most similar to the faces in photos")
    search.add_argument("photos", nargs="+", help="query photos (local paths or s3://)")
    search.add_argument("--index", required=True, help="the index root (OUT of `facebatch index` + `facebatch people`)")
    search.add_argument("--top-k", type=positive_int, default=20, help="matches per query face (default %(default)s)")
    search.add_argument("--min-similarity", type=_fraction, default=-1.0, help="drop matches below this cosine similarity (default: none)")
    search.add_argument("--pipeline-version", help="search this version's index (default: the newest)")
    search.add_argument("--json", action="store_true", help="one JSON object per photo")
    search.add_argument("--device", default="auto")
    search.add_argument("--threads", type=positive_int, help="torch CPU threads")
    search.add_argument("--s3-endpoint")
    search.set_defaults(func=run_search_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"facebatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"facebatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        # Storage failed (not the input): the message names the object; staged state is kept for the next run.
        print(f"facebatch {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
