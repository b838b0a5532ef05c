"""bench/detector_tradeoffs.py: how a subset of the annotated faces is scored."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from detector_tradeoffs import score  # noqa: E402


def _at_least_40(g):
    return np.minimum(g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]) >= 40


def test_faces_outside_a_subset_are_neither_misses_nor_false_positives():
    gts = [np.array([[0, 0, 100, 100], [200, 200, 220, 220]], float), np.zeros((0, 4))]
    ignores = [np.zeros(2, bool), np.zeros(0, bool)]
    # One detection per face, one on nothing, and a photo without faces that has one detection.
    dets = [np.array([[0, 0, 100, 100], [200, 200, 220, 220], [400, 400, 500, 500]], float),
            np.array([[10, 10, 60, 60]], float)]
    recall, precision, faces = score(dets, gts, ignores, _at_least_40, 0.4)
    # The 20-px face's detection counts neither way; the two on nothing are false positives.
    assert (faces, recall, precision) == (1, 1.0, 1 / 3)
    recall, precision, faces = score(dets, gts, ignores, lambda g: np.ones(len(g), bool), 0.4)
    assert (faces, recall, precision) == (2, 1.0, 2 / 4)


def test_a_missed_face_lowers_recall_only_in_a_subset_that_holds_it():
    # A 60-px face and a 20-px face are missed.
    gts = [np.array([[0, 0, 100, 100], [300, 300, 360, 360], [500, 500, 520, 520]], float)]
    dets = [np.array([[0, 0, 100, 100]], float)]
    recall, precision, faces = score(dets, gts, [np.zeros(3, bool)], _at_least_40, 0.4)
    assert (faces, recall, precision) == (2, 0.5, 1.0)
    recall, precision, faces = score(dets, gts, [np.zeros(3, bool)], lambda g: np.ones(len(g), bool), 0.4)
    assert (faces, recall, precision) == (3, 1 / 3, 1.0)
