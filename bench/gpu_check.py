"""One-shot device check: detector parity GPU vs CPU, memory budget, throughput, peak memory.

    python bench/gpu_check.py                                  # one GPU, no network, < 8 minutes
    python bench/gpu_check.py --device cpu --limit 3 --max-side 640 --batch-sizes 1,2 \\
        --seconds-per-config 1                                 # the script itself, on a CPU

Photos: every decodable file under ``../shared/data/faces`` (or FACEBATCH_SHARED_DATA/faces,
or ``--photos DIR``), decoded as the pipeline decodes them (facebatch.decode, EXIF orientation
applied, reduced to ``--max-side``, the pipeline's default 2048).

1. Parity: the CPU detector (the reference path) against the device detector on the same
   pixels: the project's parity criteria (facebatch.evaluation, CPU faces as the reference)
   and the largest box / score / landmark difference of matched faces. With ``--device cpu``
   the "device" detector is a CPU detector running the GPU's planning (all canvases and crops
   in as few calls as the budget allows).
2. Memory budget: the device detector again with ``--small-budget`` bytes (2 GiB on CUDA,
   16 MiB on the CPU): the same faces in more calls; on CUDA the peak allocated memory is
   reported against the budget.
3. Throughput at each ``--batch-size`` (16, 64, 128): images/s of the detector alone and of
   detect + align + embed (FaceAnalyzer, as the Ray actor runs it), images decoded in
   advance and cycled (bench/gpu_detector.py's `throughput`), with peak GPU memory
   (torch.cuda.max_memory_allocated) and out-of-memory retries per configuration.
4. Host/device traffic of one batch (torch.profiler): kernel launches, memcpy calls and
   explicit synchronisations (CUDA), aten ops (any device), and facebatch's own host -> device
   transfers (facebatch.staging: a constant per batch, whatever its size).

5. JPEG decoding (``--gpu-jpeg-decode``): which photos go to nvJPEG, its pixels against the CPU
   decoder's (same array sizes; mean / p99 / max absolute difference) and the device detector's
   faces on both (the project's parity criteria), and images/s of the CPU decoder on all CPUs
   but one against nvJPEG in batches of 64 (``--decode-seconds`` each). Without CUDA or
   torchvision the nvJPEG half says why it was skipped.

Prints one report and, with ``--json PATH``, writes it as JSON; exits 1 when parity or the
budget check fails. ``--time-budget-s`` (default 420) stops the throughput sweep early.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import benchlib
from benchlib import SHARED

from gpu_detector import sync, throughput  # noqa: E402  (reused, not duplicated)

from facebatch import staging  # noqa: E402
from facebatch.detector import MTCNNDetector  # noqa: E402
from facebatch.evaluation import box_iou, greedy_match, parity_ok, reference_parity  # noqa: E402

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif"}


def load_photos(folder: Path, limit: int | None, max_side: int) -> tuple[list[str], list[np.ndarray]]:
    from facebatch.decode import DecodeError, decode_image

    names, images = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
        try:
            decoded = decode_image(path.read_bytes(), max_side=max_side)
        except DecodeError:
            continue
        names.append(str(path.relative_to(folder)))
        images.append(np.ascontiguousarray(decoded.rgb))
        if limit and len(images) >= limit:
            break
    return names, images


def _decode_on_cpu(data: bytes, max_side: int) -> int:
    from facebatch.decode import decode_image

    return decode_image(data, max_side=max_side).rgb.shape[0]


def jpeg_decoding(folder: Path, names: list[str], cpu_images: list[np.ndarray], device: torch.device, max_side: int,
                  seconds: float, detector) -> dict:
    """5. The JPEGs --gpu-jpeg-decode passes on: nvJPEG against the CPU decoder (pixels of the
    same arrays, and the device detector's faces on both), and images/s of each: the CPU decoder
    on all CPUs but one (processes), nvJPEG in batches of 64 on the device."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from facebatch.decode import plan_jpeg
    from facebatch.device_jpeg import DeviceJpegDecoder, NvJpegUnavailable, nvjpeg_batch_decoder

    files = {name: (folder / name).read_bytes() for name in names}
    jpegs = [name for name in names if plan_jpeg(files[name], max_side=max_side) is not None]
    out: dict = {"photos": len(names), "passed_on": len(jpegs)}
    if not jpegs:
        return out
    data = [files[name] for name in jpegs]
    workers = max(1, (os.cpu_count() or 2) - 1)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_on_cpu, data[:workers], [max_side] * workers))  # start the workers
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            done += len(list(pool.map(_decode_on_cpu, data, [max_side] * len(data), chunksize=2)))
        out["cpu_decoder"] = {"processes": workers, "images_per_s": round(done / (time.perf_counter() - t0), 1)}
    try:
        decoder = DeviceJpegDecoder(nvjpeg_batch_decoder(device), max_side=max_side)
    except NvJpegUnavailable as exc:
        out["nvjpeg"] = {"skipped": str(exc)}
        return out
    decoded = []
    for start in range(0, len(data), 64):
        decoded.extend(decoder.decode(data[start : start + 64]))
    by_name = dict(zip(names, cpu_images))
    means, p99, worst, same_size = [], [], 0, 0
    pairs = []
    for name, image in zip(jpegs, decoded):
        want = by_name[name]
        if image is None or tuple(image.shape) != want.shape:
            continue
        same_size += 1
        diff = np.abs(image.cpu().numpy().astype(np.int16) - want.astype(np.int16))
        means.append(float(diff.mean()))
        p99.append(float(np.percentile(diff, 99)))
        worst = max(worst, int(diff.max()))
        pairs.append((image, want))
    faces = compare(detect_batches(detector, [p[0] for p in pairs], 16), detect_batches(detector, [p[1] for p in pairs], 16))
    batch = (data * (1 + 64 // len(data)))[:64]
    decoder.decode(batch)  # warm-up (nvJPEG handles, allocator)
    sync(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += len(decoder.decode(batch))
    sync(device)
    out["nvjpeg"] = {
        "images_per_s": round(done / (time.perf_counter() - t0), 1), "refused": sum(d is None for d in decoded),
        "same_size": same_size, "pixel_mean_abs_diff": round(float(np.mean(means)), 3) if means else None,
        "pixel_worst_mean_abs_diff": round(max(means), 3) if means else None,
        "pixel_p99_abs_diff": max(p99) if p99 else None, "pixel_max_abs_diff": worst, "faces": faces,
    }
    return out


def detect_batches(detector, images, batch_size):
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(detector.detect(images[start : start + batch_size]))
    return out


def compare(results, reference) -> dict:
    """Parity of `results` against `reference` detections (the project's criteria) and the
    largest differences between matched faces."""
    as_reference = [
        [{"box": r.boxes[i].tolist(), "score": float(r.scores[i]), "landmarks": r.landmarks[i].tolist()}
         for i in range(len(r))]
        for r in reference
    ]
    stats = reference_parity(results, as_reference)
    box = score = marks = 0.0
    count_mismatch = 0
    for ours, ref in zip(results, reference):
        count_mismatch += int(len(ours) != len(ref))
        for i, j in greedy_match(box_iou(ref.boxes, ours.boxes), 0.5):
            box = max(box, float(np.abs(ours.boxes[j] - ref.boxes[i]).max()))
            score = max(score, float(abs(ours.scores[j] - ref.scores[i])))
            marks = max(marks, float(np.abs(ours.landmarks[j] - ref.landmarks[i]).max()))
    stats.update(ok=parity_ok(stats), images_with_other_face_count=count_mismatch, max_box_diff_px=box,
                 max_score_diff=score, max_landmark_diff_px=marks)
    return stats


def device_detector(device: str, **kwargs) -> MTCNNDetector:
    detector = MTCNNDetector(device=device, **kwargs)
    if detector.device.type == "cpu":
        detector._gpu_planning = True  # the GPU's planning, run on the CPU
    return detector


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_COPY = ("cudaMemcpyAsync", "cudaMemcpy", "cudaMemcpy2DAsync")


def count_runtime_calls(fn, device: torch.device) -> dict:
    """Runtime calls of one fn() seen by torch.profiler: CUDA launches, copies (a copy from
    pageable memory, or back to the host, waits for the stream) and explicit syncs; aten ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        names = Counter(event.name for event in prof.events())
    except Exception as exc:  # the profiler is a nice-to-have here
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = {"aten_ops": sum(c for name, c in names.items() if name.startswith("aten::"))}
    if device.type == "cuda":
        out.update(launches=sum(names[n] for n in _LAUNCH), copies=sum(names[n] for n in _COPY),
                   syncs=sum(names[n] for n in _SYNC))
    return out


class AnalyzeAsDetect:
    """FaceAnalyzer behind the `detect(images)` interface that gpu_detector.throughput drives."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        self.device = analyzer.detector.device

    def detect(self, images):
        return self.analyzer.analyze(images)


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--photos", type=Path, default=None, help="folder of photos (default: the shared corpus)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N decodable photos")
    parser.add_argument("--max-side", type=int, default=2048, help="decode like the pipeline (default %(default)s)")
    parser.add_argument("--batch-sizes", default="16,64,128")
    parser.add_argument("--seconds-per-config", type=float, default=15.0)
    parser.add_argument("--small-budget", default=None, help="bytes for the budget check (default 2G on CUDA, 16M on CPU)")
    parser.add_argument("--no-embed", action="store_true", help="throughput of the detector only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--time-budget-s", type=float, default=420.0)
    parser.add_argument("--decode-seconds", type=float, default=10.0, help="per decoder in the JPEG decoding check")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available; run with --device cpu --limit 3 to check the script", file=sys.stderr)
        return 2
    folder = args.photos or SHARED / "faces"
    if not folder.is_dir():
        print(f"no photos at {folder} (use --photos DIR or set FACEBATCH_SHARED_DATA)", file=sys.stderr)
        return 2
    report: dict = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    t0 = time.perf_counter()
    names, images = load_photos(folder, args.limit, args.max_side)
    if not images:
        print(f"no decodable photos under {folder}", file=sys.stderr)
        return 2
    megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    report["photos"] = {"count": len(images), "megapixels": round(megapixels, 2), "decode_s": round(time.perf_counter() - t0, 2)}
    print(f"{report.get('gpu', 'CPU')}, torch {torch.__version__}: {len(images)} photos, {megapixels:.2f} MP, "
          f"decoded in {report['photos']['decode_s']} s")
    failed = False

    # ---- 1. parity: CPU path vs device path ----
    cpu = MTCNNDetector(device="cpu")
    t0 = time.perf_counter()
    cpu_results = detect_batches(cpu, images, 16)
    cpu_s = time.perf_counter() - t0
    detector = device_detector(args.device)
    detect_batches(detector, images[:2], 2)  # warm-up (cuDNN heuristics, allocator)
    t0 = time.perf_counter()
    dev_results = detect_batches(detector, images, 16)
    sync(device)
    dev_s = time.perf_counter() - t0
    parity = compare(dev_results, cpu_results)
    parity.update(cpu_s=round(cpu_s, 2), device_s=round(dev_s, 2), faces_cpu=sum(len(r) for r in cpu_results),
                  faces_device=sum(len(r) for r in dev_results),
                  tf32=(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    report["parity"] = parity
    failed |= not parity["ok"]
    print(f"parity device vs CPU: {'PASS' if parity['ok'] else 'FAIL'}: {parity['matched']}/{parity['reference_faces']} "
          f"confident faces matched, extra {parity['extra_confident']}, faces {parity['faces_device']} vs "
          f"{parity['faces_cpu']}; max diff box {parity['max_box_diff_px']:.3g} px, score "
          f"{parity['max_score_diff']:.3g}, landmarks {parity['max_landmark_diff_px']:.3g} px "
          f"(TF32 matmul/cudnn {parity['tf32']}; CPU {cpu_s:.1f} s, device {dev_s:.1f} s)")

    # ---- 2. a small memory budget: the same faces in more calls ----
    small = args.small_budget or ("2G" if device.type == "cuda" else "16M")
    batch = images[: min(len(images), 64)]
    big_results = detector.detect(batch)
    big_calls = dict(detector.last_calls)
    del detector
    if device.type == "cuda":
        torch.cuda.empty_cache()
    budgeted = device_detector(args.device, memory_budget_bytes=small)
    budgeted.detect(batch[:2])
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reset_peak(device)
    small_results = budgeted.detect(batch)
    peak = peak_gib(device)
    same = compare(small_results, big_results)
    budget_ok = (same["ok"] and same["images_with_other_face_count"] == 0
                 and sum(budgeted.last_calls.values()) > sum(big_calls.values()))
    over = None
    if peak is not None:
        over = (peak * 2**30 - base) / budgeted._explicit_budget
    report["budget"] = {"budget_bytes": budgeted._explicit_budget, "calls_unlimited": big_calls,
                        "calls_budgeted": dict(budgeted.last_calls), "same_results": same, "peak_gib": peak,
                        "peak_over_budget": over, "oom_retries": budgeted.oom_retries, "ok": budget_ok}
    failed |= not budget_ok
    print(f"budget {small}: {'PASS' if budget_ok else 'FAIL'}: calls {big_calls} -> {budgeted.last_calls}, "
          f"max diff box {same['max_box_diff_px']:.3g} px, score {same['max_score_diff']:.3g}"
          + (f", peak {peak:.2f} GiB = {over:.2f} of the budget" if peak is not None else "")
          + f", OOM retries {budgeted.oom_retries}")
    del budgeted

    # ---- 5. (first, while the device detector is loaded) nvJPEG against the CPU decoder ----
    decoding = jpeg_decoding(folder, names, images, device, args.max_side, args.decode_seconds, device_detector(args.device))
    report["jpeg_decoding"] = decoding
    nv = decoding.get("nvjpeg", {})
    print(f"JPEG decoding: {decoding['passed_on']} of {decoding['photos']} photos go to the device decoder; CPU decoder "
          f"{decoding.get('cpu_decoder')}; nvJPEG " + (nv["skipped"] if "skipped" in nv else
          f"{nv.get('images_per_s')} images/s, refused {nv.get('refused')}, pixels mean |diff| "
          f"{nv.get('pixel_mean_abs_diff')} (worst photo {nv.get('pixel_worst_mean_abs_diff')}, max {nv.get('pixel_max_abs_diff')}), "
          f"faces parity {'PASS' if nv.get('faces', {}).get('ok') else 'FAIL'}, same array sizes {nv.get('same_size')}"))
    if nv and "skipped" not in nv:
        # Parity over what nvJPEG actually decoded, and it must have decoded every file it was given.
        nv["ok"] = nv["faces"]["ok"] and nv["refused"] == 0 and nv["same_size"] == decoding["passed_on"]
        failed |= not nv["ok"]

    # ---- 3. throughput, peak memory, OOM retries; 4. runtime calls of one batch ----
    from facebatch.inference import FaceAnalyzer

    analyzer = FaceAnalyzer(device=args.device, embed=not args.no_embed, max_pixels=None)
    if device.type == "cpu":  # the GPU's planning and one-transfer staging, run on the CPU
        analyzer.detector._gpu_planning = True
        analyzer.stage_batches = True
    subjects = {"detect": analyzer.detector}
    if not args.no_embed:
        subjects["detect+embed"] = AnalyzeAsDetect(analyzer)
    rows = []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for name, subject in subjects.items():
        for bs in batch_sizes:
            if time.perf_counter() - started > args.time_budget_s:
                print("time budget reached; stopping the sweep")
                break
            reset_peak(device)
            retries = analyzer.oom_retries
            rate, median_ms = throughput(subject, images, bs, args.seconds_per_config)
            rows.append({"what": name, "batch": bs, "images_per_s": round(rate, 2), "median_ms_per_image": round(median_ms, 2),
                         "peak_gib": peak_gib(device), "oom_retries": analyzer.oom_retries - retries,
                         "detector_calls_last_batch": dict(analyzer.detector.last_calls)})
    report["throughput"] = rows
    bs = batch_sizes[0]
    stream = (images * (1 + bs // len(images)))[:bs]
    transfers_before = staging.TRANSFERS.count
    calls = count_runtime_calls(lambda: analyzer.analyze(stream), device)
    # Host -> device transfers facebatch made (facebatch.staging); a constant, whatever the batch.
    calls["facebatch_transfers"] = staging.TRANSFERS.count - transfers_before
    report["runtime_calls_per_batch"] = {"batch": bs, **calls}

    print(f"\n{'what':14} {'batch':>5} {'images/s':>9} {'ms/img':>8} {'peak GiB':>9} {'OOM':>4}  detector calls (last batch)")
    for r in rows:
        peak_text = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['what']:14} {r['batch']:5d} {r['images_per_s']:9.1f} {r['median_ms_per_image']:8.1f} {peak_text:>9} "
              f"{r['oom_retries']:4d}  {r['detector_calls_last_batch']}")
    print(f"runtime calls, one batch of {bs} (detect+align+embed): {report['runtime_calls_per_batch']}")
    report["oom_retries_total"] = analyzer.oom_retries
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = not failed
    print(f"{'PASS' if not failed else 'FAIL'} in {report['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
