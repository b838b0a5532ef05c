"""Detection evaluation shared by the parity test, the recall/precision bench and the GPU check.

Users who swap a model or a parameter can run the same comparison against their own reference.
"""

from __future__ import annotations

import numpy as np

# The parity criteria (issue "Batched MTCNN cascade face detector"): of the reference's faces with
# score >= CONFIDENT, at least 98% matched at IoU >= MATCH_IOU, landmarks within 3% of the box
# width on average, extra confident faces at most 2% of the reference's count.
CONFIDENT = 0.9
MATCH_IOU = 0.9
PARITY_LIMITS = {"recall_vs_reference": 0.98, "mean_landmark_error_frac_width": 0.03, "extra_frac": 0.02}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N,4) and (M,4) x1,y1,x2,y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_match(iou: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one (row, column) matches, best IoU first, down to min_iou."""
    pairs: list[tuple[int, int]] = []
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


def reference_parity(results, reference_faces, confident: float = CONFIDENT, match_iou: float = MATCH_IOU) -> dict:
    """Aggregate parity of detections (objects with boxes, scores, landmarks) against reference
    faces (dicts with box, score, landmarks), image by image."""
    ref_confident = matched = extra = 0
    landmark_errors = []
    for ours, ref_faces in zip(results, reference_faces):
        ref_boxes = np.array([f["box"] for f in ref_faces], np.float64).reshape(-1, 4)
        ref_scores = np.array([f["score"] for f in ref_faces], np.float64)
        ref_marks = np.array([f["landmarks"] for f in ref_faces], np.float64).reshape(-1, 5, 2)
        conf = ref_scores >= confident
        ref_confident += int(conf.sum())
        pairs = greedy_match(box_iou(ref_boxes, ours.boxes), match_iou)
        for i, j in pairs:
            if conf[i]:
                matched += 1
                width = ref_boxes[i, 2] - ref_boxes[i, 0]
                dist = np.linalg.norm(np.asarray(ours.landmarks[j], np.float64) - ref_marks[i], axis=1).mean()
                landmark_errors.append(dist / width)
        matched_ours = {j for _, j in pairs}
        extra += sum(1 for j in range(len(ours.scores)) if ours.scores[j] >= confident and j not in matched_ours)
    return {
        "reference_faces": ref_confident,
        "matched": matched,
        "recall_vs_reference": matched / max(ref_confident, 1),
        "mean_landmark_error_frac_width": float(np.mean(landmark_errors)) if landmark_errors else 0.0,
        "extra_confident": extra,
        "extra_frac": extra / max(ref_confident, 1),
    }


def parity_ok(stats: dict) -> bool:
    return (stats["recall_vs_reference"] >= PARITY_LIMITS["recall_vs_reference"]
            and stats["mean_landmark_error_frac_width"] <= PARITY_LIMITS["mean_landmark_error_frac_width"]
            and stats["extra_frac"] <= PARITY_LIMITS["extra_frac"])


# ---------------------------------------------------------------------------------------------
# Clustering metrics (people): each -1 prediction counts as a cluster of its own.

def _contingency(pred, truth):
    pred = np.asarray(pred, np.int64).ravel().copy()
    truth = np.asarray(truth, np.int64).ravel()
    if len(pred) != len(truth):
        raise ValueError("pred and truth must have the same length")
    noise = pred < 0
    if noise.any():  # -1 -> singletons with fresh ids
        pred[noise] = (pred.max(initial=-1) + 1) + np.arange(int(noise.sum()))
    p = np.unique(pred, return_inverse=True)[1]
    t = np.unique(truth, return_inverse=True)[1]
    pairs, n_pt = np.unique(p * (t.max(initial=0) + 1) + t, return_counts=True)
    n_p, n_t = np.bincount(p), np.bincount(t)
    return pairs // (t.max(initial=0) + 1), pairs % (t.max(initial=0) + 1), n_pt, n_p, n_t


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def bcubed(pred, truth) -> tuple[float, float, float]:
    """BCubed (precision, recall, F) of predicted cluster labels against true labels; a -1
    prediction is a singleton cluster."""
    if len(np.asarray(pred)) == 0:
        return 1.0, 1.0, 1.0
    pi, ti, n_pt, n_p, n_t = _contingency(pred, truth)
    n = n_p.sum()
    c = n_pt.astype(np.float64) ** 2
    p = float((c / n_p[pi]).sum() / n)
    r = float((c / n_t[ti]).sum() / n)
    return p, r, _f(p, r)


def pairwise_f(pred, truth) -> tuple[float, float, float]:
    """Pairwise (precision, recall, F): over pairs of faces put together by pred / by truth
    (-1 = singleton). Precision is 1 when pred pairs nothing, recall is 1 when truth does."""
    if len(np.asarray(pred)) == 0:
        return 1.0, 1.0, 1.0
    _, _, n_pt, n_p, n_t = _contingency(pred, truth)
    pairs = lambda c: float((c.astype(np.float64) * (c - 1) / 2).sum())  # noqa: E731
    tp, pp, tt = pairs(n_pt), pairs(n_p), pairs(n_t)
    p = tp / pp if pp else 1.0
    r = tp / tt if tt else 1.0
    return p, r, _f(p, r)
