"""Parity of the batched detector with facenet-pytorch 2.5.3's MTCNN on the shared corpus.

Reference: ../shared/data/reference/mtcnn_facenet_pytorch.json (same parameters: min face
20 px, thresholds 0.6/0.7/0.7, factor 0.709, full resolution). Images are decoded as the
reference did (Pillow, convert('RGB'), no EXIF transpose); only images whose EXIF
orientation is absent or 1 are compared. Skips cleanly without the corpus.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from facebatch.detector import MTCNNDetector

CONFIDENT = 0.9
MATCH_IOU = 0.9
BATCH = 16


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N,4) and (M,4) x1,y1,x2,y2 boxes."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def greedy_match(iou: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one matches, best IoU first."""
    pairs = []
    if iou.size == 0:
        return pairs
    iou = iou.copy()
    while True:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[i, j] < min_iou:
            return pairs
        pairs.append((int(i), int(j)))
        iou[i, :] = -1
        iou[:, j] = -1


def load_reference_images(shared_data):
    from PIL import Image

    reference = json.loads((shared_data / "reference" / "mtcnn_facenet_pytorch.json").read_text())["images"]
    names, images, faces = [], [], []
    for name, entry in sorted(reference.items()):
        if "faces" not in entry:  # undecodable for the reference too
            continue
        path = shared_data / "faces" / name
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112)
            if orientation not in (None, 1):
                continue
            rgb = np.asarray(im.convert("RGB"))
        assert [rgb.shape[1], rgb.shape[0]] == entry["size"], name
        names.append(name)
        images.append(rgb)
        faces.append(entry["faces"])
    return names, images, faces


def compare(ours_list, ref_faces_list):
    """Aggregate parity figures over images."""
    ref_confident = matched = extra = 0
    landmark_errors = []
    for ours, ref_faces in zip(ours_list, ref_faces_list):
        ref_boxes = np.array([f["box"] for f in ref_faces], np.float64).reshape(-1, 4)
        ref_scores = np.array([f["score"] for f in ref_faces], np.float64)
        ref_marks = np.array([f["landmarks"] for f in ref_faces], np.float64).reshape(-1, 5, 2)
        conf = ref_scores >= CONFIDENT
        ref_confident += int(conf.sum())
        iou = box_iou(ref_boxes, ours.boxes.astype(np.float64))
        pairs = greedy_match(iou, MATCH_IOU)
        matched_ref = {i for i, _ in pairs}
        matched_ours = {j for _, j in pairs}
        for i, j in pairs:
            if conf[i]:
                matched += 1
                width = ref_boxes[i, 2] - ref_boxes[i, 0]
                dist = np.linalg.norm(ours.landmarks[j].astype(np.float64) - ref_marks[i], axis=1).mean()
                landmark_errors.append(dist / width)
        del matched_ref
        extra += sum(1 for j in range(len(ours)) if ours.scores[j] >= CONFIDENT and j not in matched_ours)
    return {
        "reference_faces": ref_confident,
        "matched": matched,
        "recall_vs_reference": matched / max(ref_confident, 1),
        "mean_landmark_error_frac_width": float(np.mean(landmark_errors)) if landmark_errors else 0.0,
        "extra_confident": extra,
        "extra_frac": extra / max(ref_confident, 1),
    }


@pytest.fixture(scope="module")
def parity(shared_data):
    names, images, faces = load_reference_images(shared_data)
    assert len(images) > 150, "expected most of the corpus to be covered"
    detector = MTCNNDetector(device="cpu", max_pixels=None)  # full resolution, like the reference
    # Batches of similar sizes (as a pipeline would form them), mixed sizes within a batch.
    order = np.argsort([im.shape[0] * im.shape[1] for im in images], kind="stable")
    results = [None] * len(images)
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        for i, res in zip(idx, detector.detect([images[i] for i in idx])):
            results[i] = res
    stats = compare(results, faces)
    stats["images"] = len(images)
    print("\nparity vs facenet-pytorch:", json.dumps(stats, indent=1))
    return stats


def test_recall_of_reference_faces(parity):
    assert parity["reference_faces"] > 100
    assert parity["recall_vs_reference"] >= 0.98, parity


def test_landmarks_match(parity):
    assert parity["mean_landmark_error_frac_width"] <= 0.03, parity


def test_few_extra_faces(parity):
    assert parity["extra_frac"] <= 0.02, parity
