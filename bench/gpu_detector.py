"""Detector check for a CUDA machine: parity with facenet-pytorch, then throughput.

    python bench/gpu_detector.py [--device cuda] [--batch-sizes 1,32,128] [--limit N]
                                 [--seconds-per-config 20] [--skip-autocast]

Self-contained apart from facebatch itself and ../shared/data (or FACEBATCH_SHARED_DATA):

1. Parity, fp32 and autocast: every reference image whose EXIF orientation is absent or 1,
   decoded as the reference did (Pillow, convert('RGB'), no EXIF transpose), full resolution,
   the reference's parameters. Criteria as in tests/test_detector_parity.py: >= 98% of the
   reference's faces with score >= 0.9 matched (IoU >= 0.9), mean landmark error <= 3% of box
   width, extra faces with score >= 0.9 <= 2% of the reference's count.
2. Throughput (images/s, median ms per image) for each batch size, fp32 and autocast, on the
   same images cycled in corpus order (mixed sizes), each configuration capped at
   --seconds-per-config after a warm-up batch.

Prints one table; exits 1 if a parity check fails. Designed to finish within 5 minutes on one
GPU; on CPU use a small --limit (it runs, slowly).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

import benchlib
from benchlib import SHARED

from facebatch.detector import MTCNNDetector  # noqa: E402
from facebatch.evaluation import parity_ok, reference_parity  # noqa: E402



def load_reference_images(limit):
    from PIL import Image

    reference = json.loads((SHARED / "reference" / "mtcnn_facenet_pytorch.json").read_text())["images"]
    images, faces = [], []
    for name, entry in sorted(reference.items()):
        if "faces" not in entry:
            continue
        with Image.open(SHARED / "faces" / name) as im:
            if im.getexif().get(0x0112) not in (None, 1):
                continue
            images.append(np.asarray(im.convert("RGB")))
        faces.append(entry["faces"])
        if limit and len(images) >= limit:
            break
    return images, faces


def parity(results, ref_faces_list):
    stats = reference_parity(results, ref_faces_list)
    return parity_ok(stats), (
        f"{stats['matched']}/{stats['reference_faces']} matched ({stats['recall_vs_reference']:.4f}), "
        f"landmarks {stats['mean_landmark_error_frac_width']:.5f} of width, "
        f"extra {stats['extra_confident']} ({stats['extra_frac']:.4f})"
    )


def detect_all(detector, images, batch_size):
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(detector.detect(images[start : start + batch_size]))
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(detector, images, batch_size, seconds):
    """(images/s, median ms per image) over batches cycled through the corpus."""
    stream = (images * (1 + (batch_size * 4) // max(len(images), 1)))
    detector.detect(stream[:batch_size])  # warm-up
    sync(detector.device)
    done, per_image, start = 0, [], time.perf_counter()
    position = 0
    while time.perf_counter() - start < seconds:
        batch = stream[position : position + batch_size]
        if len(batch) < batch_size:
            position = 0
            continue
        t0 = time.perf_counter()
        detector.detect(batch)
        sync(detector.device)
        per_image.append((time.perf_counter() - t0) / len(batch))
        done += len(batch)
        position += batch_size
    elapsed = time.perf_counter() - start
    return done / elapsed, float(np.median(per_image)) * 1000


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seconds-per-config", type=float, default=20.0)
    parser.add_argument("--skip-autocast", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    args = parser.parse_args()
    if not (SHARED / "faces" / "MANIFEST.json").is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    images, ref_faces = load_reference_images(args.limit)
    print(f"{len(images)} images ({sum(i.shape[0] * i.shape[1] for i in images) / 1e6:.1f} MP) loaded in {time.perf_counter() - t0:.1f}s")
    if torch.device(args.device).type == "cuda":
        print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)

    precisions = [False] if args.skip_autocast else [False, True]
    failed = False
    rows = []
    for autocast in precisions:
        label = "autocast fp16" if autocast else "fp32"
        if autocast and torch.device(args.device).type != "cuda":
            label += " (no-op off CUDA)"
        t0 = time.perf_counter()
        detector = MTCNNDetector(device=args.device, max_pixels=None, autocast=autocast)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = detect_all(detector, images, 32)
        sync(args.device)
        ok, text = parity(results, ref_faces)
        failed |= not ok
        print(f"parity {label}: {'PASS' if ok else 'FAIL'}: {text} (start-up {startup:.2f}s, pass {time.perf_counter() - t0:.1f}s)")
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            rate, median_ms = throughput(detector, images, bs, args.seconds_per_config)
            rows.append((label, bs, rate, median_ms))
        del detector
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'precision':32} {'batch':>5} {'images/s':>9} {'median ms/img':>14}")
    for label, bs, rate, median_ms in rows:
        print(f"{label:32} {bs:5d} {rate:9.1f} {median_ms:14.1f}")
    if torch.device(args.device).type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
