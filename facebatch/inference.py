"""Detector + alignment + embedder over a batch of decoded images, plus per-face quality figures.

Plain Python + torch (no Ray): the Ray actor, the `facebatch detect` command and the benchmarks
all call `FaceAnalyzer.analyze`, so what is tested here is what runs on the cluster.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import DetectorParams
from .models import resolve_device
from .staging import upload_all


@dataclass
class ImageFaces:
    """Faces of one image, in pixels of the full-size oriented image, sorted by score (desc)."""

    boxes: np.ndarray  # (N, 4) x1, y1, x2, y2
    scores: np.ndarray  # (N,)
    landmarks: np.ndarray  # (N, 5, 2)
    embeddings: np.ndarray | None  # (N, 128) L2-normalised, or None when embedding is off
    face_size: np.ndarray  # (N,)
    roll: np.ndarray  # (N,) degrees
    yaw: np.ndarray  # (N,) -1..1
    sharpness: np.ndarray  # (N,) NaN when embedding is off (no chip)

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class StageTimes:
    detect_s: float = 0.0
    embed_s: float = 0.0
    images: int = 0
    faces: int = 0
    extra: dict = field(default_factory=dict)


def pose_figures(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roll (degrees of the eye line) and a yaw proxy from 5 landmarks, vectorised."""
    if len(landmarks) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    left_eye, right_eye, nose = landmarks[:, 0], landmarks[:, 1], landmarks[:, 2]
    eye_vec = right_eye - left_eye
    roll = np.degrees(np.arctan2(eye_vec[:, 1], eye_vec[:, 0]))
    eye_dist = np.maximum(np.linalg.norm(eye_vec, axis=1), 1e-6)
    unit = eye_vec / eye_dist[:, None]
    # Signed position of the nose along the eye line, relative to the eyes' midpoint:
    # 0 for a frontal face, towards +-1 as the head turns to a profile.
    offset = ((nose - (left_eye + right_eye) / 2) * unit).sum(axis=1)
    yaw = np.clip(offset / (eye_dist / 2), -1.0, 1.0)
    return roll.astype(np.float32), yaw.astype(np.float32)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def chip_sharpness(chips: torch.Tensor) -> np.ndarray:
    """Variance of the Laplacian of each grey chip (N,150,150,3 uint8): low = blurred face."""
    if chips.shape[0] == 0:
        return np.zeros(0, np.float32)
    x = chips.permute(0, 3, 1, 2).float()
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    lap = F.conv2d(grey, _LAPLACIAN.to(grey.device))
    return lap.flatten(1).var(dim=1).cpu().numpy().astype(np.float32)


class FaceAnalyzer:
    """Loads the models once; `analyze` runs one batched pass over many images."""

    def __init__(
        self,
        device: str = "auto",
        detector_params: DetectorParams | None = None,
        embed: bool = True,
        max_pixels: int | None = None,
        memory_budget_bytes: int | str | None = None,
    ):
        from .detector import MTCNNDetector

        self.device = str(resolve_device(device))
        params = detector_params or DetectorParams()
        t0 = time.perf_counter()
        detector_kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        self.detector = MTCNNDetector(
            device=self.device,
            min_face_size=params.min_face_size,
            thresholds=tuple(params.thresholds),
            scale_factor=params.scale_factor,
            memory_budget_bytes=memory_budget_bytes,
            **detector_kwargs,
        )
        self.embedder = None
        if embed:
            from .embedder import FaceEmbedder

            self.embedder = FaceEmbedder(device=self.device, memory_budget_bytes=memory_budget_bytes)
        self.load_seconds = time.perf_counter() - t0
        #: Upload each batch to the device once, for both detection and alignment (CUDA; the
        #: tests set it on the CPU together with the detector's GPU planning).
        self.stage_batches = torch.device(self.device).type == "cuda"

    @property
    def oom_retries(self) -> int:
        """Model calls halved after an out-of-memory error (detector and embedder), cumulative."""
        return self.detector.oom_retries + (self.embedder.oom_retries if self.embedder is not None else 0)

    def model_hashes(self) -> dict[str, str]:
        hashes = {f"mtcnn_{k}": v for k, v in self.detector.weights_sha256.items()}
        if self.embedder is not None:
            hashes["dlib_resnet_v1"] = self.embedder.weights_sha256
        return hashes

    def _align(self, images, detections) -> torch.Tensor | None:
        """The aligned chips of every face (None without an embedder or without faces)."""
        counts = [len(d.scores) for d in detections]
        if self.embedder is None or not sum(counts):
            return None
        landmarks = np.concatenate([d.landmarks for d in detections]).astype(np.float32)
        return self.embedder.align(images, np.repeat(np.arange(len(images)), counts), landmarks)

    @contextlib.contextmanager
    def _budgets_less(self, nbytes: int):
        """Explicit memory budgets of the models lowered by `nbytes` for the block."""
        models = [m for m in (self.detector, self.embedder) if m is not None and m._explicit_budget is not None]
        saved = [m._explicit_budget for m in models]
        for m in models:
            m._explicit_budget = max(1 << 20, m._explicit_budget - nbytes)
        try:
            yield
        finally:
            for m, budget in zip(models, saved):
                m._explicit_budget = budget

    def analyze(self, images: list[np.ndarray], scales: list[float] | None = None, times: StageTimes | None = None) -> list[ImageFaces]:
        """Faces of every image. `scales[i]` maps image i's pixels to its full-size original
        (a reduced-size decode has scale > 1); boxes and landmarks come back in original pixels."""
        if not images:
            return []
        scales = scales if scales is not None else [1.0] * len(images)
        n_images = len(images)
        t0 = time.perf_counter()
        max_pixels = self.detector.max_pixels
        device = torch.device(self.device)
        if self.stage_batches and all(
            (isinstance(im, np.ndarray) or (isinstance(im, torch.Tensor) and im.device == device))
            and im.dtype in (np.uint8, torch.uint8) and im.ndim == 3 and im.shape[2] == 3
            and (max_pixels is None or im.shape[0] * im.shape[1] <= max_pixels) for im in images
        ):
            # One pinned transfer for the whole batch (facebatch.staging): the detector
            # integrates these pixels and the alignment cuts its face regions from them,
            # instead of each uploading its own copies image by image. Images already on the
            # device (decoded there by nvJPEG) stay where they are.
            host = [k for k, im in enumerate(images) if isinstance(im, np.ndarray)]
            images = list(images)
            for k, sent in zip(host, upload_all([images[k] for k in host], device)):
                images[k] = sent
            staged_bytes = sum(int(im.shape[0]) * int(im.shape[1]) * 3 for im in images)
        else:
            staged_bytes = 0
        # The staged batch is this actor's memory too: explicit budgets (a GPU shared by several
        # actors) shrink by it while it lives; budgets read from the free memory already see it.
        with self._budgets_less(staged_bytes):
            detections = self.detector.detect(images)
            t1 = time.perf_counter()
            chips = self._align(images, detections)
        del images  # the staged batch: freed before the embedder's calls
        if chips is not None:
            chips_t = torch.as_tensor(chips)
            embeddings = np.asarray(self.embedder.embed_chips(chips), dtype=np.float32)
            sharpness = chip_sharpness(chips_t)
        counts = [len(d.scores) for d in detections]
        total = sum(counts)
        if chips is None:
            embeddings = None if self.embedder is None else np.zeros((0, 128), np.float32)
            sharpness = np.full(total, np.nan, np.float32)
        t2 = time.perf_counter()
        if times is not None:
            times.detect_s += t1 - t0
            times.embed_s += t2 - t1
            times.images += n_images
            times.faces += total

        results: list[ImageFaces] = []
        start = 0
        for det, n, scale in zip(detections, counts, scales):
            sl = slice(start, start + n)
            start += n
            boxes = np.asarray(det.boxes, np.float32).reshape(-1, 4) * scale
            lms = np.asarray(det.landmarks, np.float32).reshape(-1, 5, 2) * scale
            roll, yaw = pose_figures(lms)
            results.append(
                ImageFaces(
                    boxes=boxes,
                    scores=np.asarray(det.scores, np.float32).reshape(-1),
                    landmarks=lms,
                    embeddings=None if embeddings is None else embeddings[sl],
                    face_size=np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).astype(np.float32),
                    roll=roll,
                    yaw=yaw,
                    sharpness=sharpness[sl],
                )
            )
        return results
