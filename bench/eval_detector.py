"""Detector recall and precision on the human-annotated boxes of the shared detection set.

    .venv/bin/python bench/eval_detector.py [--iou 0.4] [--threads 2]

Ground truth: `labels.gt_boxes` ([x, y, w, h] in stored pixels) of ../shared/data/faces/
detection (images without a `gt_boxes` list are not annotated and are left out; an empty list
means "no face"). Boxes flagged in `gt_ignore` neither count as misses nor make a detection
that overlaps them a false positive. A detection matches a ground-truth box at IoU >= --iou
(greedy, best IoU first, one-to-one). Our detections (full resolution, reference parameters)
are shown next to facenet-pytorch's, read from the reference JSON. Images are decoded as the
reference did (Pillow, convert('RGB'), no EXIF transpose).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import benchlib
from benchlib import SHARED

from facebatch.detector import MTCNNDetector  # noqa: E402
from facebatch.evaluation import box_iou  # noqa: E402



def score_image(detections: np.ndarray, gt: np.ndarray, ignore: np.ndarray, min_iou: float):
    """(true positives, false positives, ground-truth faces counted) for one image."""
    counted = int((~ignore).sum())
    if len(detections) == 0:
        return 0, 0, counted
    if len(gt) == 0:
        return 0, len(detections), counted
    iou = box_iou(detections, gt)
    det_used = np.zeros(len(detections), bool)
    gt_used = np.zeros(len(gt), bool)
    for flat in np.argsort(-iou, axis=None):
        d, g = np.unravel_index(flat, iou.shape)
        if iou[d, g] < min_iou:
            break
        if det_used[d] or gt_used[g]:
            continue
        det_used[d] = gt_used[g] = True
    tp = int((gt_used & ~ignore).sum())
    fp = 0
    for d in np.nonzero(~det_used)[0]:
        # An unmatched detection on an ignored face is not an error either (a detection
        # matched to an ignored face is neither a hit nor an error).
        if ignore.any() and iou[d, ignore].max() >= min_iou:
            continue
        fp += 1
    return tp, fp, counted


def load_annotated():
    """The annotated detection photos: (manifest entries, RGB images decoded as the reference
    decoded them, ground-truth boxes as x1, y1, x2, y2, their `gt_ignore` flags)."""
    from PIL import Image

    manifest = json.loads((SHARED / "faces" / "MANIFEST.json").read_text())
    entries = [
        f for f in manifest["files"]
        if f["set"] == "detection" and isinstance(f.get("labels", {}).get("gt_boxes"), list)
    ]
    images, gts, ignores = [], [], []
    for entry in entries:
        with Image.open(SHARED / "faces" / entry["path"]) as im:
            images.append(np.asarray(im.convert("RGB")))
        boxes = np.array(entry["labels"]["gt_boxes"], np.float64).reshape(-1, 4)
        gts.append(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1))
        ignore = entry["labels"].get("gt_ignore") or [False] * len(boxes)
        ignores.append(np.array(ignore, bool))
    return entries, images, gts, ignores


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--iou", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (SHARED / "faces" / "MANIFEST.json").is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    torch.set_num_threads(args.threads)
    reference = json.loads((SHARED / "reference" / "mtcnn_facenet_pytorch.json").read_text())["images"]
    entries, images, gts, ignores = load_annotated()
    refs = [np.array([f["box"] for f in reference[entry["path"]]["faces"]], np.float64).reshape(-1, 4)
            for entry in entries]

    detector = MTCNNDetector(device=args.device, max_pixels=None)
    ours = [r.boxes.astype(np.float64) for r in detector.detect(images)]

    print(f"{len(images)} annotated images, {sum(int((~i).sum()) for i in ignores)} faces "
          f"({sum(int(i.sum()) for i in ignores)} ignored), IoU >= {args.iou}")
    header = f"{'':18} {'subset':>10} {'faces':>6} {'found':>6} {'dets':>6} {'recall':>7} {'precision':>9}"
    print(header)
    print("-" * len(header))
    subsets = {
        "all": lambda path: True,
        "dlib": lambda path: "/dlib/" in path,
        "widerface": lambda path: "/widerface_val/" in path,
        "no-face": None,
    }
    for label, dets in (("ours", ours), ("facenet-pytorch", refs)):
        for subset, keep in subsets.items():
            tp = fp = faces = 0
            for entry, d, g, ign in zip(entries, dets, gts, ignores):
                if keep is None:
                    if len(g):
                        continue
                elif not keep(entry["path"]):
                    continue
                a, b, c = score_image(d, g, ign, args.iou)
                tp, fp, faces = tp + a, fp + b, faces + c
            recall = f"{tp / faces:.3f}" if faces else "-"
            precision = f"{tp / (tp + fp):.3f}" if tp + fp else "-"
            print(f"{label:18} {subset:>10} {faces:6d} {tp:6d} {tp + fp:6d} {recall:>7} {precision:>9}")


if __name__ == "__main__":
    main()
