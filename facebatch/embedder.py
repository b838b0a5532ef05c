"""Face embeddings: dlib's ResNet face descriptor, batched in torch.

    from facebatch.embedder import FaceEmbedder
    emb = FaceEmbedder(device="cpu")                     # "cpu" | "cuda" | "cuda:0" | "auto"
    chips = emb.align(images, image_index, landmarks)    # (N, 150, 150, 3) uint8 torch tensor
    vecs = emb.embed_chips(chips)                         # (N, 128) float32, L2-normalised
    vecs = emb.embed(images, image_index, landmarks)      # align + embed; N = 0 -> (0, 128)
    same = vecs_a @ vecs_b.T >= emb.threshold             # cosine similarity

``images`` are HxWx3 uint8 RGB arrays, ``image_index`` (N,) says which image each face is in,
``landmarks`` (N, 5, 2) are MTCNN's points in image pixels: left eye, right eye, nose, left and
right mouth corner ("left" = image left).

Vectors and threshold
---------------------
dlib's network outputs unnormalised 128-d descriptors (see :meth:`raw_descriptors`; norms
1.32-1.63, mean 1.48 on the shared corpus) and dlib calls two faces the same person when their
Euclidean distance is below 0.6. The stored embeddings are L2-normalised float32, so that a dot
product is the cosine similarity and any vector index (DuckDB vss, FAISS, ...) can use inner
product. For unit vectors ``||a - b||^2 = 2 - 2 cos``; for two raw vectors of the same norm r,
dlib's d < 0.6 reads ``cos > 1 - 0.18 / r^2``, i.e. ~0.918 at r = 1.48. Norms differ between
faces, so the threshold was calibrated directly on the shared corpus's 2,003 verification pairs
(382 same person, 1,621 different) with this module's own pipeline (facebatch's MTCNN, largest
face, this alignment and network).

Flip averaging (the default since pipeline schema 2): each chip is embedded together with its
mirror image and the two raw descriptors are summed before normalising. On the shared pairs it
keeps the best accuracy at 0.9990 and ROC AUC at 0.99998 (0.99997 without), and it widens the
interval of equally best thresholds from (0.9291, 0.9311] to (0.9339, 0.9390], i.e. a margin
2.5x as wide between the hardest same and different pairs, which is what clustering and search
live on; it costs a second pass of the network (about 15% of the per-image compute). Hence
:data:`COSINE_THRESHOLD` = 0.936 (without flip averaging it was 0.93, next to dlib's own
reference descriptors read as cosines, (0.9284, 0.9298]). 0.936 is Euclidean ~0.54 between raw
vectors of norm 1.48: a bit stricter than dlib's 0.6, in line with dlib's own best Euclidean
threshold on these pairs (0.574-0.579). bench/eval_pairs.py reproduces these figures.

Alignment follows dlib's ``get_face_chip(size=150, padding=0.25)`` (see
:mod:`facebatch.alignment`); MTCNN's points are mapped onto the positions where they sit, on
average, in dlib's chips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from facebatch.alignment import CHIP_SIZE, MTCNN_TEMPLATE, align_faces
from facebatch.dlib_model import DlibResNet, load_dlib_resnet
from facebatch import gpumem
from facebatch.models import disable_tf32, resolve_device
# The same-person cosine threshold of flip-averaged embeddings (module docstring), defined with the
# tables' contract so that reading it needs no torch.
from facebatch.tables import COSINE_THRESHOLD
from facebatch.versions import EMBEDDER_CODE_VERSION  # noqa: F401  (bump it there with any result-changing change here)

__all__ = ["COSINE_THRESHOLD", "EMBEDDING_DIM", "FaceEmbedder", "resolve_device"]

EMBEDDING_DIM = 128

_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Device memory per image through the network (the 150x150 input, its float copy and the
#: activations alive at once): measured 1.24 MB on the CPU (gpumem.peak_tensor_bytes,
#: tests/test_gpumem.py); 2 MiB leaves room for cuDNN workspaces. Flip averaging puts two
#: images through per chip.
EMBED_BYTES_PER_IMAGE = 2 * 1024 * 1024


class FaceEmbedder:
    """Align and embed faces with dlib's face-recognition ResNet, in batches.

    batch_size bounds how many chips go through the network at once, not what a call accepts;
    a memory budget bounds it further: ``memory_budget_bytes`` (or FACEBATCH_GPU_MEMORY_BYTES),
    else on CUDA a fraction of the free memory at each call, divided by
    :data:`EMBED_BYTES_PER_IMAGE` per network input; out of memory halves the batch and runs it
    again (``oom_retries``). ``last_calls`` counts the network calls of the last embedding.

    precision "fp16"/"bf16" runs the network under autocast on CUDA (descriptors stay within
    cosine 0.999 of fp32, see bench/gpu_embedder.py); the CPU always computes in fp32. "fp32"
    on CUDA is true fp32: the constructor turns TF32 off for cuBLAS and cuDNN (process-wide
    torch settings) unless ``tf32=True``.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        model_path: str | Path | None = None,
        batch_size: int = 64,
        precision: str = "fp32",
        antialias: bool = True,
        flip_average: bool = True,
        memory_budget_bytes: int | str | None = None,
        tf32: bool = False,
    ):
        if precision not in _AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.antialias = antialias
        self.flip_average = flip_average
        self._autocast_dtype = _AUTOCAST_DTYPES[precision] if self.device.type == "cuda" else None
        self._explicit_budget = gpumem.explicit_budget(memory_budget_bytes)
        self.memory_fraction = gpumem.DEFAULT_FRACTION
        self._oom = gpumem.OomCounter()
        self.last_calls = 0
        if self.device.type == "cuda" and not tf32:
            disable_tf32()
        network: DlibResNet = load_dlib_resnet(model_path)
        # channels_last: the chips arrive as NHWC uint8, and oneDNN/cuDNN convolutions are faster
        # in that layout (measured in bench/bench_embedder.py).
        self.network = network.to(self.device).to(memory_format=torch.channels_last)
        self.weights_sha256: str = network.sha256
        self.threshold: float = COSINE_THRESHOLD
        self.template = MTCNN_TEMPLATE

    @property
    def oom_retries(self) -> int:
        """Batches halved after an out-of-memory error, since construction."""
        return self._oom.retries

    # ---------------------------------------------------------------------------------------

    def align(self, images: Sequence[np.ndarray], image_index, landmarks) -> torch.Tensor:
        """(N, 150, 150, 3) uint8 RGB chips on this embedder's device; one warp for all faces."""
        return align_faces(
            images,
            image_index,
            landmarks,
            template=self.template,
            size=CHIP_SIZE,
            antialias=self.antialias,
            device=self.device,
        )

    def raw_descriptors(self, chips) -> np.ndarray:
        """dlib's unnormalised 128-d descriptors of (N, 150, 150, 3) uint8 RGB chips (no flip
        averaging: exactly what dlib computes)."""
        return self._forward(chips, normalise=False, flip=False)

    def embed_chips(self, chips) -> np.ndarray:
        """(N, 128) float32 L2-normalised embeddings of (N, 150, 150, 3) uint8 RGB chips."""
        return self._forward(chips, normalise=True, flip=self.flip_average)

    def embed(self, images: Sequence[np.ndarray], image_index, landmarks) -> np.ndarray:
        """Align and embed: (N, 128) float32, L2-normalised; N = 0 gives (0, 128)."""
        return self.embed_chips(self.align(images, image_index, landmarks))

    # ---------------------------------------------------------------------------------------

    def _forward(self, chips, normalise: bool, flip: bool) -> np.ndarray:
        chips = torch.as_tensor(chips)
        if chips.dim() != 4 or tuple(chips.shape[1:]) != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"chips must be (N, {CHIP_SIZE}, {CHIP_SIZE}, 3), got {tuple(chips.shape)}")
        if chips.dtype != torch.uint8:
            raise ValueError(f"chips must be uint8 RGB, got {chips.dtype}")
        self.last_calls = 0
        n = chips.shape[0]
        if n == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        batch_size = self.batch_size
        budget = gpumem.call_budget(self.device, self._explicit_budget, self.memory_fraction)
        if budget is not None:
            batch_size = max(1, min(batch_size, budget // (EMBED_BYTES_PER_IMAGE * (2 if flip else 1))))

        def call(start: int, stop: int) -> torch.Tensor:
            batch = chips[start:stop].to(self.device, non_blocking=True)
            # NHWC uint8 -> NCHW float whose memory stays NHWC (= channels_last), no copy back.
            x = batch.permute(0, 3, 1, 2).float()
            del batch
            if flip:
                # The chip and its mirror image in one call; their descriptors are summed.
                x = torch.cat([x, x.flip(3)])
            if self._autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                    descriptors = self.network(x).float()
            else:
                descriptors = self.network(x)
            del x
            if flip:
                descriptors = descriptors[: stop - start] + descriptors[stop - start :]
            if normalise:
                descriptors = torch.nn.functional.normalize(descriptors, dim=1)
            return descriptors.cpu()

        def counted():
            self.last_calls += 1

        with torch.inference_mode():
            outputs = gpumem.run_chunked(call, n, batch_size, counter=self._oom, device=self.device,
                                         what="embedder", on_call=counted)
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)
