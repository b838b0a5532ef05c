"""Detector speed on the shared corpus, next to facenet-pytorch's recorded seconds
(for facenet-pytorch timed in the same run, on the same pixels, see bench/compare_peers.py).

    .venv/bin/python bench/bench_detector.py [--device cpu] [--batch-sizes 1,32] [--limit N]
                                             [--threads 2] [--repeats 1]

Images: the detection and identity sets of ../shared/data/faces that the reference covers,
decoded as the reference did (Pillow, convert('RGB'), no EXIF transpose), full resolution,
the reference's parameters (min face 20, thresholds 0.6/0.7/0.7, factor 0.709). Batches
keep the corpus order, so sizes are mixed within a batch. Start-up (weights) is reported
separately. Each batch size runs a first ("cold") pass, which also pays oneDNN's kernel
generation for every new canvas / crop-batch shape and the growth of the reused buffers, then
--repeats warm passes whose fastest time per batch is reported (a long-running job is warm).
Timings are wall clock.
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



def load_images(limit: int | None):
    from PIL import Image

    reference = json.loads((SHARED / "reference" / "mtcnn_facenet_pytorch.json").read_text())["images"]
    manifest = json.loads((SHARED / "faces" / "MANIFEST.json").read_text())
    names, images, ref_seconds = [], [], []
    for entry in manifest["files"]:
        name = entry["path"]
        if entry["set"] not in ("detection", "identity") or "seconds" not in reference.get(name, {}):
            continue
        with Image.open(SHARED / "faces" / name) as im:
            images.append(np.asarray(im.convert("RGB")))
        names.append(name)
        ref_seconds.append(reference[name]["seconds"])
        if limit and len(names) >= limit:
            break
    return names, images, np.array(ref_seconds)


def run_pass(detector, images, batch_size, repeats):
    """Seconds per batch (fastest of `repeats`) and per-stage totals."""
    batch_seconds, stages = [], {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            detector.detect(batch)
            elapsed = time.perf_counter() - t0
            if best is None or elapsed < best:
                best, best_stages = elapsed, dict(detector.last_stage_seconds)
        batch_seconds.append((len(batch), best))
        for k, v in best_stages.items():
            stages[k] = stages.get(k, 0.0) + v
    return batch_seconds, stages


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="warm passes (fastest kept)")
    args = parser.parse_args()
    if not (SHARED / "faces" / "MANIFEST.json").is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    torch.set_num_threads(args.threads)

    names, images, ref_seconds = load_images(args.limit)
    megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6

    t0 = time.perf_counter()
    detector = MTCNNDetector(device=args.device, max_pixels=None)
    startup = time.perf_counter() - t0

    print(f"{len(images)} images, {megapixels:.1f} MP, device {detector.device}, torch threads {torch.get_num_threads()}")
    print(f"start-up (weights load + convert): {startup * 1000:.0f} ms")
    ref_total = float(ref_seconds.sum())
    header = f"{'':24} {'median ms/img':>14} {'images/s':>9} {'total s':>8} {'vs reference':>13} {'cold pass s':>12}"
    print(header)
    print("-" * len(header))
    print(f"{'facenet-pytorch (ref)':24} {np.median(ref_seconds) * 1000:14.1f} {len(images) / ref_total:9.1f} {ref_total:8.2f} {'1.0x':>13} {'':>12}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        cold_seconds, _ = run_pass(detector, images, bs, 1)
        cold = sum(s for _, s in cold_seconds)
        batch_seconds, stages = run_pass(detector, images, bs, args.repeats)
        per_image = np.array([s / n for n, s in batch_seconds])
        total = sum(s for _, s in batch_seconds)
        label = f"ours, batch {bs}"
        print(f"{label:24} {np.median(per_image) * 1000:14.1f} {len(images) / total:9.1f} {total:8.2f} {ref_total / total:12.1f}x {cold:12.2f}")
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
        print(f"{'':24} stages (s): {stage_text}")


if __name__ == "__main__":
    main()
