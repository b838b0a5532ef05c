"""Face verification on the shared corpus's 2,003 pairs: our pipeline vs dlib's own.

    .venv/bin/python bench/eval_pairs.py [--landmarks mtcnn|dlib68] [--threads 2]

Per image (Pillow decode, EXIF orientation applied, RGB): the largest face our MTCNN detector
finds (or, with --landmarks dlib68, MTCNN-style points from dlib's HOG detector and 68-point
model: eye centres, nose tip, mouth corners), aligned and embedded by facebatch.embedder.
Scores are cosine similarities of the L2-normalised embeddings. Prints, for ours (with and
without pyramid antialiasing) and for dlib's reference descriptors
(../shared/data/reference/dlib_descriptors.json, Euclidean distance): accuracy at the
documented threshold, the best accuracy and the interval of thresholds reaching it, ROC AUC and
the true-accept rate at 0.1% false accepts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import benchlib
from benchlib import SHARED

from facebatch.embedder import FaceEmbedder  # noqa: E402



def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Probability that a random same pair outscores a random different pair (ties count half)."""
    positives, negatives = scores[same], scores[~same]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """Highest true-accept rate with at most `far` of different pairs accepted (score >= t)."""
    negatives = np.sort(scores[~same])[::-1]
    allowed = int(np.floor(far * len(negatives)))
    threshold = np.nextafter(negatives[allowed], np.inf)  # just above the first one not allowed
    return float((scores[same] >= threshold).mean()), float(threshold)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float, float]:
    """(best accuracy, low, high): accepting score >= t reaches it for every t in (low, high]."""
    candidates = np.unique(scores)
    accuracies = np.array([((scores >= t) == same).mean() for t in candidates])
    best = accuracies.max()
    best_index = np.flatnonzero(accuracies == best)
    # t = candidates[i] is best; t may go down to just above the next lower score.
    i = best_index[len(best_index) // 2]
    low = candidates[i - 1] if i > 0 else -np.inf
    return float(best), float(low), float(candidates[i])


def summarise(name: str, scores: np.ndarray, same: np.ndarray, threshold: float) -> dict:
    accuracy = float(((scores >= threshold) == same).mean())
    best, low, high = best_threshold(scores, same)
    tar, _ = tar_at_far(scores, same, 0.001)
    row = {
        "name": name,
        "accuracy": accuracy,
        "threshold": threshold,
        "best_accuracy": best,
        "best_interval": (low, high),
        "auc": roc_auc(scores, same),
        "tar_at_far_0.1%": tar,
        "errors": int(((scores >= threshold) != same).sum()),
    }
    return row


def dlib68_landmarks(images: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    import dlib

    from facebatch.dlib_model import default_model_path

    models = default_model_path().parent
    detector = dlib.get_frontal_face_detector()
    shape68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
    result = {}
    for key, image in images.items():
        boxes = detector(image, 1)
        if len(boxes) == 0:
            result[key] = None
            continue
        box = max(boxes, key=lambda r: r.area())
        p = np.array([[q.x, q.y] for q in shape68(image, box).parts()], dtype=np.float64)
        result[key] = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
    return result


def mtcnn_landmarks(images: dict[str, np.ndarray], batch: int = 8) -> dict[str, np.ndarray | None]:
    from facebatch.detector import MTCNNDetector

    detector = MTCNNDetector(device="cpu")
    keys = list(images)
    result = {}
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        for key, detections in zip(chunk, detector.detect([images[k] for k in chunk])):
            if len(detections.boxes) == 0:
                result[key] = None
                continue
            boxes = np.asarray(detections.boxes)
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            result[key] = np.asarray(detections.landmarks)[int(np.argmax(areas))]
    return result


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--landmarks", choices=["mtcnn", "dlib68"], default="mtcnn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest_path = SHARED / "faces" / "MANIFEST.json"
    if not manifest_path.is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    pairs = json.loads(manifest_path.read_text())["pairs"]
    keys = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    images = {k: load_rgb(SHARED / "faces" / k) for k in keys}

    start = time.perf_counter()
    landmarks = (mtcnn_landmarks if args.landmarks == "mtcnn" else dlib68_landmarks)(images)
    detect_s = time.perf_counter() - start
    missing = [k for k, v in landmarks.items() if v is None]
    found = [k for k in keys if landmarks[k] is not None]

    embedder = FaceEmbedder(device="cpu")
    plain = FaceEmbedder(device="cpu", flip_average=False)
    image_list = [images[k] for k in found]
    points = np.stack([landmarks[k] for k in found]).astype(np.float32)
    start = time.perf_counter()
    vectors = embedder.embed(image_list, np.arange(len(found)), points)
    embed_s = time.perf_counter() - start
    without_flip = plain.embed(image_list, np.arange(len(found)), points)
    without_aa = FaceEmbedder(device="cpu", antialias=False).embed(image_list, np.arange(len(found)), points)
    raw = embedder.raw_descriptors(embedder.align(image_list, np.arange(len(found)), points))

    row_of = {k: i for i, k in enumerate(found)}
    same = np.array([p["same"] for p in pairs])

    def cosine(table: np.ndarray) -> np.ndarray:
        # A pair with a face-less image scores -1: rejected, counted as an error when same.
        return np.array(
            [float(table[row_of[p["a"]]] @ table[row_of[p["b"]]]) if p["a"] in row_of and p["b"] in row_of else -1.0 for p in pairs]
        )

    reference = json.loads((SHARED / "reference" / "dlib_descriptors.json").read_text())
    dlib_vectors = {k: np.array(v) for k, v in reference["descriptors"].items()}
    dlib_scores = np.array([-np.linalg.norm(dlib_vectors[p["a"]] - dlib_vectors[p["b"]]) for p in pairs])
    rows = [
        summarise(f"ours ({args.landmarks} landmarks), cosine", cosine(vectors), same, embedder.threshold),
        summarise(f"ours, no flip averaging", cosine(without_flip), same, embedder.threshold),
        summarise(f"ours, no pyramid antialiasing", cosine(without_aa), same, embedder.threshold),
        summarise("dlib 20.0.1 reference, -euclidean", dlib_scores, same, -0.6),
    ]
    distance_to_dlib = np.array([np.linalg.norm(raw[row_of[k]] - dlib_vectors[k]) for k in found if k in dlib_vectors])

    print(f"{len(pairs)} pairs ({same.sum()} same, {(~same).sum()} different), {len(keys)} images; "
          f"faces found in {len(found)}; none in {missing or 'none'}")
    print(f"landmarks {detect_s:.1f} s, align+embed {embed_s:.1f} s ({len(found) / embed_s:.0f} faces/s)")
    print(f"our raw descriptors vs dlib's reference (same image): median {np.median(distance_to_dlib):.3f}, "
          f"90th pct {np.percentile(distance_to_dlib, 90):.3f}, max {distance_to_dlib.max():.3f} (match threshold 0.6)")
    header = f"{'':45} {'thresh':>8} {'acc':>7} {'errors':>6} {'best acc':>8} {'best interval':>19} {'AUC':>7} {'TAR@0.1%':>8}"
    print(header)
    for r in rows:
        low, high = r["best_interval"]
        print(f"{r['name']:45} {r['threshold']:8.4f} {r['accuracy']:7.4f} {r['errors']:6d} {r['best_accuracy']:8.4f} "
              f"({low:8.4f},{high:8.4f}] {r['auc']:7.5f} {r['tar_at_far_0.1%']:8.4f}")
    print(f"dlib's reference file says accuracy_at_0.6 = {reference['accuracy_at_0.6']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "missing": missing}, indent=2))


if __name__ == "__main__":
    main()
