"""The `facebatch` command: detect, index, demo, compact, people, search."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from .config import ConfigError, DetectorParams, IndexConfig
from .storage import StorageError


def _thresholds(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be three comma-separated numbers, got {text!r}")
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"thresholds must be three comma-separated numbers (P,R,O-Net), got {text!r}")
    return values  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_detector_options(parser: argparse.ArgumentParser) -> None:
    defaults = DetectorParams()
    group = parser.add_argument_group("detector")
    group.add_argument("--min-face-size", type=int, default=defaults.min_face_size, help="smallest face in pixels (default %(default)s)")
    group.add_argument("--thresholds", type=_thresholds, default=defaults.thresholds, help="P-Net,R-Net,O-Net score thresholds (default 0.6,0.7,0.7)")
    group.add_argument("--scale-factor", type=float, default=defaults.scale_factor, help="image pyramid scale factor (default %(default)s)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda when available)")


def add_index_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `facebatch index` and jobs/index_archive.py (the `ray job submit` entrypoint)."""
    parser.add_argument("source", help="local directory, s3://bucket/prefix, or a manifest .csv/.parquet with a 'uri' column")
    parser.add_argument("--out", required=True, help="output root (local directory or s3://bucket/prefix)")
    add_detector_options(parser)
    defaults = IndexConfig(source="-", out="-")
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-pixels", type=_positive_int, default=defaults.max_pixels, help="reject images above this many pixels, read from the header (default %(default)s)")
    group.add_argument("--max-side", type=_positive_int, default=defaults.max_side, help="longest side the models see; bigger JPEGs use reduced-size decoding (default %(default)s)")
    group.add_argument("--no-embed", action="store_true", help="detect faces only, no embeddings")
    group = parser.add_argument_group("ray")
    group.add_argument("--batch-size", type=_positive_int, help="images per inference batch (default 64 on GPU, 16 on CPU)")
    group.add_argument("--num-actors", type=_positive_int, help="inference actors to start with (default: one per GPU, or one per 4 CPUs)")
    group.add_argument("--max-actors", type=_positive_int,
                       help="let the actor pool grow up to this many while work is queued (autoscaling clusters add "
                            "GPU nodes for them) and shrink when idle (default: --num-actors, a fixed pool)")
    group.add_argument("--read-concurrency", type=_positive_int, help="concurrent fetch+decode tasks")
    group.add_argument("--decode-tasks", action=argparse.BooleanOptionalAction, default=None,
                       help="fetch+decode in separate Ray tasks (default on GPU clusters) or in the inference actors (default on CPU)")
    group.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, or a local Ray instance)")
    group.add_argument("--object-store-memory", type=_positive_int, help="object store bytes when starting a local Ray instance")
    group = parser.add_argument_group("incremental")
    group.add_argument("--full", action="store_true", help="reprocess every object, even those already indexed")
    group.add_argument("--reprocess-errors", action="store_true", help="also retry objects whose last row has an error status")
    group.add_argument("--prune", action="store_true", help="remove rows of objects no longer in SOURCE")
    group.add_argument("--limit", type=_positive_int, help="process at most this many objects this run (for staged backfills)")
    group.add_argument("--fetch-retries", type=int, default=defaults.fetch_retries, help="retries of a failing fetch (default %(default)s)")
    group.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                       help="fail the run, publishing nothing, when more than this fraction of its objects cannot be "
                            "fetched (at least 20, or all when fewer): an outage, not bad photos (default %(default)s)")
    group.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    group.add_argument("--run-id", help="explicit run id: letters, digits, '.', '_', '-' (default: UTC timestamp + random suffix)")


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(
        source=args.source,
        out=args.out,
        detector=DetectorParams(min_face_size=args.min_face_size, thresholds=tuple(args.thresholds), scale_factor=args.scale_factor),
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        embed=not args.no_embed,
        device=args.device,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        max_actors=args.max_actors,
        read_concurrency=args.read_concurrency,
        decode_tasks=args.decode_tasks,
        fetch_retries=args.fetch_retries,
        max_error_rate=args.max_error_rate,
        full=args.full,
        reprocess_errors=args.reprocess_errors,
        prune=args.prune,
        limit=args.limit,
        s3_endpoint=args.s3_endpoint,
        run_id=args.run_id,
    ).validate()


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


def format_summary(record: dict) -> str:
    objects = record["objects"]
    lines = [
        f"run {record['run_id']} (pipeline {record['pipeline_version']}) -> {record['out']}",
        f"  listed {objects['listed']}: new {objects['new']}, changed {objects['changed']}, "
        f"retried {objects['retry']}, unchanged {objects['unchanged']}, deleted {objects['deleted']}",
        f"  processed {record['processed']} images: "
        + ", ".join(f"{k} {v}" for k, v in sorted(record["images_by_status"].items()))
        + f"; {record['faces']} faces",
        f"  {record['seconds']['process']:.1f} s processing"
        + (f", {record['images_per_second']:.2f} images/s" if record.get("images_per_second") else ""),
    ]
    return "\n".join(lines)


def run_detect_command(args: argparse.Namespace) -> int:
    import torch

    from .decode import DecodeError, decode_image
    from .inference import FaceAnalyzer

    if args.threads:
        torch.set_num_threads(args.threads)
    params = DetectorParams(min_face_size=args.min_face_size, thresholds=tuple(args.thresholds), scale_factor=args.scale_factor)
    params.validate()
    analyzer = FaceAnalyzer(device=args.device, detector_params=params, embed=args.embed)

    def emit(path: str, result: dict) -> None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    pending: list[tuple[str, object]] = []

    def flush() -> None:
        if not pending:
            return
        faces = analyzer.analyze([img.rgb for _, img in pending], [img.scale for _, img in pending])
        for (path, img), res in zip(pending, faces):
            entry = {"path": path, "width": img.width, "height": img.height, "faces": [], "error": None}
            for k in range(len(res)):
                face = {
                    "box": [round(float(v), 2) for v in res.boxes[k]],
                    "score": round(float(res.scores[k]), 6),
                    "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in res.landmarks[k]],
                }
                if res.embeddings is not None:
                    face["embedding"] = [round(float(v), 6) for v in res.embeddings[k]]
                entry["faces"].append(face)
            emit(path, entry)
        pending.clear()

    answered = 0  # files that decoded as images (whatever faces they hold)
    for path in args.paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            img = decode_image(data, max_pixels=args.max_pixels, max_side=args.max_side)
        except DecodeError as exc:
            flush()
            emit(path, {"path": path, "width": None, "height": None, "faces": [], "error": f"{exc.status}: {exc.message}"})
            continue
        except OSError as exc:
            flush()
            emit(path, {"path": path, "width": None, "height": None, "faces": [], "error": f"unreadable: {exc.strerror or exc}"})
            continue
        pending.append((path, img))
        answered += 1
        if len(pending) >= args.batch_size:
            flush()
    flush()
    if not answered:
        print(f"facebatch detect: none of the {len(args.paths)} input(s) could be read as an image", file=sys.stderr)
        return 1
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, object_store_memory=args.object_store_memory)


def run_compact_command(args: argparse.Namespace) -> int:
    from .compact import compact

    result = compact(args.out, target_rows=args.target_rows, endpoint=args.s3_endpoint)
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
    group.add_argument("--k", type=_positive_int, default=defaults.k, help="neighbours per face in the kNN graph (default %(default)s)")
    group.add_argument("--min-size", type=_positive_int, default=defaults.min_size, help="smallest unlabelled cluster that becomes a person (default %(default)s)")
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


def format_people_summary(record: dict) -> str:
    faces = record["faces"]
    lines = [
        f"people run {record['run_id']} ({record['mode']}, pipeline {record['pipeline_version']}) -> {record['out']}",
        f"  {faces['faces']} faces: {faces.get('new_faces', 0)} new, {faces.get('assigned_to_existing', 0)} assigned to existing persons, "
        f"{faces['filtered']} filtered, {faces['unassigned']} unassigned",
        f"  {faces['persons']} persons ({faces.get('new_persons', 0)} new, {faces.get('named_persons', 0)} named)",
    ]
    return "\n".join(lines)


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
    detect.add_argument("--batch-size", type=_positive_int, default=8)
    detect.add_argument("--max-pixels", type=_positive_int, default=100_000_000)
    detect.add_argument("--max-side", type=_positive_int, default=None, help="decode at most this long side (default: full resolution)")
    detect.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    add_detector_options(detect)
    detect.set_defaults(func=run_detect_command)

    index = sub.add_parser("index", help="index an archive into Parquet tables (runs on Ray)")
    add_index_options(index)
    index.set_defaults(func=run_index_command)

    demo = sub.add_parser("demo", help="build a small demo archive and index it on a local Ray instance")
    demo.add_argument("--out", default="demo-out", help="where to put the demo archive and tables (default %(default)s)")
    demo.add_argument("--object-store-memory", type=_positive_int, default=512 * 1024 * 1024)
    demo.set_defaults(func=run_demo_command)

    compact = sub.add_parser("compact", help="merge a table's many small files into large files sorted by image_id")
    compact.add_argument("out", help="output root given to `facebatch index --out`")
    compact.add_argument("--target-rows", type=_positive_int, default=2_000_000, help="rows per output file (default %(default)s)")
    compact.add_argument("--s3-endpoint")
    compact.set_defaults(func=run_compact_command)

    people = sub.add_parser("people", help="group the indexed faces into persons (incremental; publishes people, face_people and a search index)")
    add_people_options(people)
    people.set_defaults(func=run_people_command)

    search = sub.add_parser("search", help="find the indexed faces and persons most similar to the faces in photos")
    search.add_argument("photos", nargs="+", help="query photos (local paths or s3://)")
    search.add_argument("--index", required=True, help="the index root (OUT of `facebatch index` + `facebatch people`)")
    search.add_argument("--top-k", type=_positive_int, default=20, help="matches per query face (default %(default)s)")
    search.add_argument("--min-similarity", type=_fraction, default=-1.0, help="drop matches below this cosine similarity (default: none)")
    search.add_argument("--pipeline-version", help="search this version's index (default: the newest)")
    search.add_argument("--json", action="store_true", help="one JSON object per photo")
    search.add_argument("--device", default="auto")
    search.add_argument("--threads", type=_positive_int, help="torch CPU threads")
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
