"""What the detector's speed knobs cost: time on the shared corpus next to recall and precision
on its human-annotated boxes, for several settings of min face size and pyramid scale factor.

    .venv/bin/python bench/detector_tradeoffs.py [--settings 20:0.709,40:0.709] [--batch-size 32]
                                                 [--threads 2] [--iou 0.4]

Each setting is MIN_FACE_SIZE:SCALE_FACTOR (`facebatch index --min-face-size N --scale-factor F`).
The first is the reference setting (facenet-pytorch's defaults, facebatch's default): the others
are timed against it. Per setting: one cold pass (oneDNN kernel generation for new shapes), then
a warm pass whose seconds are reported, over the detection and identity sets (the 153 photos of
bench/bench_detector.py, full resolution); then recall and precision on the annotated faces of the
detection set, scored as bench/eval_detector.py scores them (greedy one-to-one matching at IoU >=
--iou, `gt_ignore` faces neither hits nor misses), for all annotated faces, for those at least
40 px on their shorter side, and for the two WIDER FACE crowd images (many faces under 20 px).
"kept" compares with the reference setting on all 153 photos: of its faces at least as large as
the setting's min face size (shorter box side), the share this setting also finds, at IoU >= 0.5
(the same face) and at IoU >= 0.9 (nearly the same box: another pyramid samples other scales).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import benchlib
from bench_detector import load_images
from benchlib import SHARED
from eval_detector import load_annotated, score_image

from facebatch.detector import MTCNNDetector  # noqa: E402
from facebatch.evaluation import box_iou  # noqa: E402


def score(dets, gts, ignores, keep, iou):
    """(recall, precision, faces) over the images; `keep(gt_boxes)` picks the faces that count
    (the others are treated like `gt_ignore`: neither hits nor misses)."""
    tp = fp = faces = 0
    for d, g, ign in zip(dets, gts, ignores):
        a, b, c = score_image(d, g, ign | ~keep(g), iou)
        tp, fp, faces = tp + a, fp + b, faces + c
    return (tp / faces if faces else float("nan")), (tp / (tp + fp) if tp + fp else float("nan")), faces


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--settings", default="20:0.709,20:0.6,32:0.709,40:0.709,40:0.6,60:0.709")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iou", type=float, default=0.4)
    args = parser.parse_args()
    if not (SHARED / "faces" / "MANIFEST.json").is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    torch.set_num_threads(args.threads)
    settings = []
    for item in args.settings.split(","):
        size, factor = item.split(":")
        settings.append((int(size), float(factor)))

    _, timed, _ = load_images(None)
    entries, images, gts, ignores = load_annotated()
    paths = [entry["path"] for entry in entries]
    crowd = np.array(["/widerface_val/" in p for p in paths])
    subsets = {
        "all": (lambda g: np.ones(len(g), bool), np.ones(len(paths), bool)),
        ">=40px": (lambda g: np.minimum(g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]) >= 40, np.ones(len(paths), bool)),
        "crowd": (lambda g: np.ones(len(g), bool), crowd),
    }
    print(f"{len(timed)} photos timed ({sum(i.shape[0] * i.shape[1] for i in timed) / 1e6:.1f} MP, batch {args.batch_size}, "
          f"{args.threads} threads); {len(images)} annotated photos, IoU >= {args.iou}")
    header = (f"{'min face:factor':>15} {'seconds':>8} {'speed-up':>9} {'faces':>6} {'kept@0.5':>8} {'kept@0.9':>8} "
              + " ".join(f"{name + ' R/P':>17}" for name in subsets))
    print(header)
    print("-" * len(header))
    base = reference = None
    for size, factor in settings:
        detector = MTCNNDetector(device="cpu", max_pixels=None, min_face_size=size, scale_factor=factor)
        for start in range(0, len(timed), args.batch_size):  # cold pass
            detector.detect(timed[start : start + args.batch_size])
        t0 = time.perf_counter()
        boxes = []
        for start in range(0, len(timed), args.batch_size):
            boxes += [r.boxes.astype(np.float64) for r in detector.detect(timed[start : start + args.batch_size])]
        seconds = time.perf_counter() - t0
        found = sum(len(b) for b in boxes)
        base = base or seconds
        reference = reference or boxes
        kept, large = np.zeros(2), 0
        for ref, got in zip(reference, boxes):
            ref = ref[np.minimum(ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]) >= size]
            large += len(ref)
            if len(ref) and len(got):
                best = box_iou(ref, got).max(axis=1)
                kept += [(best >= 0.5).sum(), (best >= 0.9).sum()]
        kept /= max(1, large)
        dets = [r.boxes.astype(np.float64) for r in detector.detect(images)]
        cells = []
        for keep, rows in subsets.values():
            pick = np.nonzero(rows)[0]
            r, p, _ = score([dets[i] for i in pick], [gts[i] for i in pick], [ignores[i] for i in pick], keep, args.iou)
            cells.append(f"{r:.3f}/{p:.3f}")
        print(f"{f'{size}:{factor}':>15} {seconds:8.2f} {base / seconds:8.2f}x {found:6d} {kept[0]:8.3f} {kept[1]:8.3f} " + " ".join(f"{c:>17}" for c in cells))
    faces = {name: score([np.zeros((0, 4))] * int(rows.sum()), [gts[i] for i in np.nonzero(rows)[0]],
                         [ignores[i] for i in np.nonzero(rows)[0]], keep, args.iou)[2]
             for name, (keep, rows) in subsets.items()}
    print("annotated faces counted: " + ", ".join(f"{k} {v}" for k, v in faces.items()))


if __name__ == "__main__":
    main()
