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
from facebatch.evaluation import reference_parity

BATCH = 16


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
    stats = reference_parity(results, faces)
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
