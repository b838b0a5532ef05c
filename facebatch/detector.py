"""Batched MTCNN face detector (P-Net -> R-Net -> O-Net) in plain torch.

The algorithm follows facenet-pytorch 2.5.3's ``detect_face`` step by step, because the
project's reference outputs (``data/reference/mtcnn_facenet_pytorch.json``) come from it:

* pyramid scales ``12/min_face * factor**k`` while the short side stays >= 12 px, each level
  resized from the original with "area" interpolation (adaptive average pooling) to
  ``(int(h*s+1), int(w*s+1))`` and normalised as ``(x - 127.5) * 0.0078125``;
* P-Net candidates with ``prob >= t0``, NMS 0.5 per image and level, NMS 0.7 per image,
  box regression, squaring (``rerec``);
* crops cut with facenet's ``pad`` (the box is truncated to int and clamped to the image,
  so a box that leaves the image is squeezed, not zero-padded) and area-resized to 24x24;
  R-Net ``score > t1``, NMS 0.7 per image, regression, squaring;
* the same for O-Net at 48x48, ``score > t2``, landmarks from the pre-regression box,
  regression, NMS 0.7 per image with the intersection-over-minimum criterion.

What is different is the batching (the reference only batches equal-size images and cuts
every crop in a Python loop):

* Every pyramid level of every image of the batch is cut into pieces no larger than a
  canvas (overlapping by the 10 pixels P-Net's 12x12 window needs) and shelf-packed onto
  canvases at even offsets, so the stride-2 output grid lines up. On CUDA the canvases go
  through P-Net in as few calls as the memory budget allows (see ``MTCNNDetector``); on CPU
  each 384x512 canvas is one call, because small canvases run ~1.5x faster per pixel there. Outputs
  whose window is not inside one piece are masked out, and the ceil-mode pooling window
  that hangs over an odd-sized level is reproduced exactly (``_FastPNet``), so packing and
  tiling do not change the result. Canvas sizes are rounded to a few shapes because oneDNN
  generates kernels per shape.
* All pixel sampling (pyramid levels and the R-Net/O-Net crops) reads one integral image
  per input, so area averages are exact integer sums divided by the bin sizes: bit for bit
  what ``F.interpolate(mode="area")`` computes. The crops of all boxes of all images are cut
  by one gather.
* R-Net and O-Net each run over the candidates of all images at once, in chunks as large
  as the memory budget allows (on CPU in cache-sized chunks of 256 / 64 crops, padded to a
  few bucket sizes); NMS is a vectorised greedy NMS
  over candidate pairs found by a sweep, per image (or per image and level), with the
  reference's tie-breaking.

Results match the reference's JSON on the shared corpus face for face (see
tests/test_detector_parity.py). Per-stage seconds of the last call are in
``MTCNNDetector.last_stage_seconds``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gpumem
from .staging import Upload, UploadCounter
from .models import check_pickled_weights, disable_tf32, mtcnn_weight_paths, resolve_device, sha256_file
from .versions import DETECTOR_CODE_VERSION  # noqa: F401  (bump it there with any result-changing change here)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Detections",
    "MTCNNDetector",
    "PNet",
    "RNet",
    "ONet",
    "load_mtcnn_weights",
    "mtcnn_weight_paths",
]

#: Default cap on pixels per image. Larger images are downscaled (area interpolation) to
#: this many pixels before detection and the results are mapped back to original pixels.
#: 16 MP keeps every photo of a common camera (and every image of the test corpus, the
#: largest being 12.6 MP) at full resolution, while a 100+ MP scan or a decompression bomb
#: cannot exhaust memory. ``None`` disables the cap.
DEFAULT_MAX_PIXELS = 16_000_000

# ---- memory model (bytes; see MTCNNDetector and tests/test_gpumem.py) ----
#: Integral image: int32 sums of 3 channels per (h+1) x (w+1) pixel.
INTEGRAL_BYTES_PER_PIXEL = 12
#: P-Net per canvas pixel, the canvas itself (12 B, float32 RGB) included: peak of the
#: tensors alive at once in one P-Net call (canvas, _FastPNet.forward, candidate search).
#: Measured on the CPU with gpumem.peak_tensor_bytes: 80-92 B (fp32; fp16 autocast needs
#: less); ~1.7x that covers cuDNN workspaces and allocator rounding (tests/test_gpumem.py
#: keeps the figure above the measurement; bench/gpu_check.py reports the CUDA peak).
PNET_BYTES_PER_PIXEL = 160
#: R-Net / O-Net per crop: the gather indices and corner sums of the crop sampling, the crop,
#: and the network's activations. Measured 115 KB / 570 KB per crop on the CPU.
RNET_BYTES_PER_CROP = 256 * 1024
ONET_BYTES_PER_CROP = 1024 * 1024
#: The pyramid sampler's chunk buffers, bytes per chunk element (rows, differences, corners).
_SAMPLER_BYTES_PER_ELEM = 24
#: Share of the budget integral images may take before a batch is split into image groups.
_INTEGRAL_SHARE = 0.5


def _integral_bytes(h: int, w: int) -> int:
    return (h + 1) * (w + 1) * INTEGRAL_BYTES_PER_PIXEL


_NORM_MEAN = 127.5
_NORM_SCALE = 0.0078125
_PNET_CELL = 12
_PNET_STRIDE = 2


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Detections:
    """Faces found in one image, sorted by score (descending).

    boxes: (N, 4) float32 x1, y1, x2, y2 in the image's pixels; scores: (N,) float32;
    landmarks: (N, 5, 2) float32 x, y of left eye, right eye, nose, left and right mouth corner.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


# --------------------------------------------------------------------------------------
# Networks (facenet-pytorch layout, weights from the `mtcnn` PyPI package)
# --------------------------------------------------------------------------------------


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        """Returns (box regression (N,4,h,w), face probability softmax (N,2,h,w))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        """x (N,3,24,24) normalised -> (box regression (N,4), softmax (N,2))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The original Caffe nets were trained on transposed images: flatten as (N, W, H, C).
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        """x (N,3,48,48) -> (box regression (N,4), landmarks (N,10: 5 x then 5 y), softmax (N,2))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


# Parameter names in the order of the arrays in mtcnn's .lz4 lists. The `mtcnn` package puts
# the box-regression head before the face classifier (facenet-pytorch orders them the other
# way round), hence e.g. conv4_2 before conv4_1.
_ARRAY_ORDER = {
    "pnet": [
        "conv1.weight", "conv1.bias", "prelu1.weight",
        "conv2.weight", "conv2.bias", "prelu2.weight",
        "conv3.weight", "conv3.bias", "prelu3.weight",
        "conv4_2.weight", "conv4_2.bias",
        "conv4_1.weight", "conv4_1.bias",
    ],
    "rnet": [
        "conv1.weight", "conv1.bias", "prelu1.weight",
        "conv2.weight", "conv2.bias", "prelu2.weight",
        "conv3.weight", "conv3.bias", "prelu3.weight",
        "dense4.weight", "dense4.bias", "prelu4.weight",
        "dense5_2.weight", "dense5_2.bias",
        "dense5_1.weight", "dense5_1.bias",
    ],
    "onet": [
        "conv1.weight", "conv1.bias", "prelu1.weight",
        "conv2.weight", "conv2.bias", "prelu2.weight",
        "conv3.weight", "conv3.bias", "prelu3.weight",
        "conv4.weight", "conv4.bias", "prelu4.weight",
        "dense5.weight", "dense5.bias", "prelu5.weight",
        "dense6_2.weight", "dense6_2.bias",
        "dense6_3.weight", "dense6_3.bias",
        "dense6_1.weight", "dense6_1.bias",
    ],
}
_NET_CLASSES = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def _keras_to_torch(array: np.ndarray, param_name: str) -> torch.Tensor:
    """One Keras-layout array -> the torch layout of `param_name`."""
    if array.ndim == 4:  # conv kernel (kh, kw, in, out) -> (out, in, kh, kw)
        array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 3:  # PReLU slopes (1, 1, C) -> (C,)
        array = array.reshape(-1)
    elif array.ndim == 2:  # dense (in, out) -> (out, in)
        array = array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_mtcnn_weights(paths: dict[str, Path] | None = None,
                       trusted_sha256: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Build P-, R- and O-Net (eval mode, CPU, float32) from the `mtcnn` package's arrays.

    The files are pickles: each is loaded only when its SHA-256 is pinned (models.PINNED_SHA256)
    or trusted explicitly (`trusted_sha256`, or FACEBATCH_TRUSTED_WEIGHTS_SHA256); any other file
    raises models.UntrustedWeights before it is unpickled.
    Reading and converting takes a few milliseconds, so nothing is cached on disk.
    """
    import joblib  # lz4-compressed joblib pickles; imported lazily, only needed here

    paths = paths or mtcnn_weight_paths()
    nets = {}
    for name, order in _ARRAY_ORDER.items():
        check_pickled_weights(paths[name], tuple(trusted_sha256))
        arrays = joblib.load(paths[name])
        if len(arrays) != len(order):
            raise ValueError(f"{paths[name]}: expected {len(order)} arrays, got {len(arrays)}")
        net = _NET_CLASSES[name]()
        params = dict(net.named_parameters())
        state = {}
        for array, param_name in zip(arrays, order):
            tensor = _keras_to_torch(np.asarray(array), param_name)
            if tensor.shape != params[param_name].shape:
                raise ValueError(
                    f"{paths[name]}: {param_name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[param_name].shape)}"
                )
            state[param_name] = tensor
        net.load_state_dict(state)
        nets[name] = net.eval().requires_grad_(False)
    return nets


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_rgb_uint8(image, index: int, device: torch.device | None = None):
    """HxWx3 uint8 view/copy of one input image.

    Accepted: HxWx3 uint8 RGB; HxW or HxWx1 uint8 grayscale (replicated to 3 channels, as
    Pillow's convert('RGB') does); HxWx4 uint8 RGBA (alpha dropped, as convert('RGB') does).
    Anything else raises TypeError (not a uint8 numpy array) or ValueError (shape).
    An HxWx3 uint8 tensor already on ``device`` (a batch the caller uploaded once, see
    facebatch.staging) stays there; other tensors are brought to the host.
    """
    if isinstance(image, torch.Tensor):
        if (device is not None and image.device == device and image.dtype == torch.uint8
                and image.ndim == 3 and image.shape[2] == 3):
            return image.detach().contiguous()
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"image {index}: expected dtype uint8 (0-255 RGB), got {image.dtype}; "
            "convert e.g. with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image {index}: expected HxWx3 (or HxW, HxWx1, HxWx4), got shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:
        image = image[:, :, :3]
    elif channels != 3:
        raise ValueError(f"image {index}: expected 1, 3 or 4 channels, got shape {image.shape}")
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------------------
# Integral images: exact area averages for pyramid levels and crops
# --------------------------------------------------------------------------------------


class _IntegralImages:
    """Integral images of a batch, one flat int32 tensor.

    ``cv2.integral`` accumulates in int32 and wraps around past 2**31; a rectangle sum is a
    difference of entries and wraps back, so it is exact as long as the rectangle's true sum
    is below 2**31 (any rectangle under 8.4 million pixels, far more than any pyramid bin or
    crop bin). The differences are therefore computed in int32 on purpose.

    Area averages are ``sum / rows / cols`` in float32, bit-identical to
    ``F.interpolate(mode="area")`` (adaptive average pooling) on the float image.
    """

    def __init__(self, images: list, device: torch.device, workspace: "_Workspace", on_device: bool = False,
                 uploads: UploadCounter | None = None, compiled: bool = True):
        """compiled: sample host integrals with `area_kernels` (else with the torch
        expressions, the same numbers; see MTCNNDetector.detect)."""
        import cv2

        sizes = [(int(im.shape[0]) + 1) * (int(im.shape[1]) + 1) * 3 for im in images]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.row_strides = np.array([(int(im.shape[1]) + 1) * 3 for im in images], np.int64)
        self.shapes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        heights = np.array([s[0] for s in self.shapes], np.int64)
        widths = np.array([s[1] for s in self.shapes], np.int64)
        if on_device:
            # The GPU path (forced on the CPU by the tests): the uint8 pixels (4x less than the
            # sums) of every host image and the per-image tables go in one pinned transfer, and
            # the sums are integrated on the device; int32 cumsum wraps around exactly like
            # cv2's, see above. Images already on the device are used where they are. Allocated
            # per call (not kept for the actor's life): the caching allocator reuses the block,
            # and between calls the memory is free for the embedder.
            upload = Upload(device, uploads)
            host = [upload.add(im) for im in images if not isinstance(im, torch.Tensor)]
            tables = [upload.add(a) for a in (self.offsets, self.row_strides, heights, widths)]
            sent = upload.send()
            sent_images = iter(sent[: len(host)])
            pixels = [im if isinstance(im, torch.Tensor) else next(sent_images) for im in images]
            # Cloned out of the transfer buffer, so the pixels are freed once integrated.
            self.offsets_t, self.row_strides_t, self.heights_t, self.widths_t = (t.clone() for t in sent[len(host) :])
            flat = torch.empty(int(sum(sizes)), dtype=torch.int32, device=device)
            for im, offset, size in zip(pixels, self.offsets, sizes):
                h, w = im.shape[:2]
                _integrate(im, flat[offset : offset + size].view(h + 1, w + 1, 3))
        else:
            self.offsets_t, self.row_strides_t = torch.from_numpy(self.offsets), torch.from_numpy(self.row_strides)
            self.heights_t, self.widths_t = torch.from_numpy(heights), torch.from_numpy(widths)
            # Reused between calls: a fresh buffer of this size costs page faults every batch.
            flat = workspace.get("integral", int(sum(sizes)), torch.int32, device)
            flat_np = flat.numpy()
            for im, offset, size in zip(images, self.offsets, sizes):
                h, w = im.shape[:2]
                if isinstance(im, torch.Tensor):  # a CPU tensor the caller staged
                    im = im.numpy()
                cv2.integral(im, sum=flat_np[offset : offset + size].reshape(h + 1, w + 1, 3), sdepth=cv2.CV_32S)
        self.flat = flat
        self.device = device
        self.workspace = workspace
        self.on_device = on_device
        self.compiled = compiled and not on_device

    def image_view(self, i: int) -> torch.Tensor:
        h, w = self.shapes[i]
        off = int(self.offsets[i])
        return self.flat[off : off + (h + 1) * (w + 1) * 3].view(h + 1, w + 1, 3)

    def sample_grid(self, i: int, bins: "_GridBins", out: torch.Tensor, chunk_elems: int) -> None:
        """Area means of image i over one piece's bins (rows [rs, re) x cols [cs, ce), device
        tensors, see `_GridBins`), normalised like facenet-pytorch, written into out
        (rows, cols, 3).

        Separable: gather the integral's rows (contiguous copies) and difference them, then
        gather the columns. Chunked over rows into reused buffers, so temporaries stay small
        and no fresh memory is touched.
        """
        dev = self.flat.device
        c_lo, c_hi = bins.c_lo, bins.c_hi
        S = self.image_view(i)[:, c_lo:c_hi]
        n_src = c_hi - c_lo
        n_rows, n_cols = bins.rows, bins.cols
        cols, rs, re = bins.col_ends, bins.rs, bins.re
        kw = bins.kw.view(1, n_cols, 1)
        kh_all = bins.kh.view(n_rows, 1, 1)
        step = max(1, min(n_rows, chunk_elems // (n_src * 3)))
        ws = self.workspace
        rows_hi = ws.get("rows_hi", step * n_src * 3, torch.int32, dev).view(step, n_src, 3)
        rows_lo = ws.get("rows_lo", step * n_src * 3, torch.int32, dev).view(step, n_src, 3)
        corners = ws.get("corners", step * 2 * n_cols * 3, torch.int32, dev).view(step, 2 * n_cols, 3)
        total = ws.get("total", step * n_cols * 3, torch.int32, dev).view(step, n_cols, 3)
        mean = ws.get("mean", step * n_cols * 3, torch.float32, dev).view(step, n_cols, 3)
        for r0 in range(0, n_rows, step):
            m = min(n_rows, r0 + step) - r0
            hi, lo, cor, tot, avg = rows_hi[:m], rows_lo[:m], corners[:m], total[:m], mean[:m]
            torch.index_select(S, 0, re[r0 : r0 + m], out=hi)
            torch.index_select(S, 0, rs[r0 : r0 + m], out=lo)
            torch.sub(hi, lo, out=hi)
            torch.index_select(hi, 1, cols, out=cor)
            torch.sub(cor[:, n_cols:], cor[:, :n_cols], out=tot)
            # sum / rows / cols in float32: the exact expression of adaptive_avg_pool2d.
            torch.div(tot, kh_all[r0 : r0 + m], out=avg)
            torch.div(avg, kw, out=avg)
            torch.sub(avg, _NORM_MEAN, out=avg)
            torch.mul(avg, _NORM_SCALE, out=out[r0 : r0 + m])

    def sample_grid_host(self, i: int, bins: tuple, out: torch.Tensor, out_base: int, out_row_stride: int) -> None:
        """`sample_grid` for integrals on the host (not ``on_device``), with the compiled
        loop of `area_kernels`: the same numbers in one pass. bins: the piece's host arrays
        (rs, re, cs, ce, kh, kw), see `_PNetTables.host_bins`; out: the contiguous canvas
        batch, written from flat position out_base with rows out_row_stride values apart."""
        from .area_kernels import area_grid

        area_grid(self.flat.numpy(), int(self.offsets[i]), int(self.row_strides[i]), *bins, out.view(-1).numpy(),
                  out_base, out_row_stride)

    def sample_boxes(self, image_ids, rs, re, cs, ce) -> torch.Tensor:
        """Area means over per-item bins: rs/re (N, R), cs/ce (N, C) int64 -> (N, R, C, 3)
        float32, normalised. One gather of the four corners of every bin of every item
        (used for the R-/O-Net crops of all images at once); on the host, one compiled loop
        (`area_kernels.area_boxes`), the same numbers."""
        dev = self.device
        if self.compiled:
            from .area_kernels import area_boxes

            n, n_r, n_c = rs.shape[0], rs.shape[1], cs.shape[1]
            out = torch.empty((n, n_r, n_c, 3), dtype=torch.float32)
            area_boxes(self.flat.numpy(), self.offsets, self.row_strides,
                       *(np.ascontiguousarray(t.numpy()) for t in (image_ids, rs, re, cs, ce)), out.numpy())
            return out
        n, n_r, n_c = rs.shape[0], rs.shape[1], cs.shape[1]
        stride = self.row_strides_t[image_ids][:, None]
        base = self.offsets_t[image_ids][:, None]
        rows = torch.cat([rs, re], 1) * stride + base  # (N, 2R): offsets of bin top / bottom rows
        cols = (torch.cat([cs, ce], 1) * 3)[:, :, None] + torch.arange(3, device=dev)  # (N, 2C, 3)
        index = rows[:, :, None, None] + cols[:, None, :, :]  # (N, 2R, 2C, 3)
        corners = self.flat[index.view(-1)].view(n, 2, n_r, 2, n_c, 3)
        total = corners[:, 1, :, 1] - corners[:, 0, :, 1] - corners[:, 1, :, 0] + corners[:, 0, :, 0]
        kh = (re - rs).to(torch.float32)[:, :, None, None]
        kw = (ce - cs).to(torch.float32)[:, None, :, None]
        return (total.to(torch.float32) / kh / kw - _NORM_MEAN) * _NORM_SCALE


def _bins(start, length, n_out: int, device):
    """Adaptive-average-pool bins of `length` pixels starting at `start`, into `n_out` cells:
    [floor(i*L/n), ceil((i+1)*L/n)) as torch computes them. start, length: (N,) int64."""
    i = torch.arange(n_out, device=device, dtype=torch.int64)
    lo = (i[None, :] * length[:, None]) // n_out
    hi = ((i[None, :] + 1) * length[:, None] + n_out - 1) // n_out
    return start[:, None] + lo, start[:, None] + hi


def _integrate(pixels: torch.Tensor, out: torch.Tensor) -> None:
    """Integral image of HxWx3 uint8 `pixels` into the (H+1)x(W+1)x3 int32 `out` (wrapping
    int32 sums, the same numbers as cv2.integral)."""
    out[0].zero_()
    out[:, 0].zero_()
    out[1:, 1:] = torch.cumsum(pixels, 0, dtype=torch.int32).cumsum_(1)


def _bins_np(length: int, n_out: int):
    """`_bins` for one whole image side, on the host."""
    i = np.arange(n_out, dtype=np.int64)
    return (i * length) // n_out, ((i + 1) * length + n_out - 1) // n_out


#: The workspace buffers of the torch pyramid sampler, which a CPU detector uses only in its first call.
_TORCH_SAMPLER_BUFFERS = ("rows_hi", "rows_lo", "corners", "total", "mean")


class _Workspace:
    """Grow-only buffers reused across detect() calls on the CPU (avoids page faults on big
    batches); on CUDA the detector clears it after every call."""

    def __init__(self):
        self._buffers: dict = {}

    def clear(self) -> None:
        self._buffers.clear()

    def drop(self, *names: str) -> None:
        """Free the named buffers (those no later call will use)."""
        for name in names:
            self._buffers.pop(name, None)

    def get(self, name: str, numel: int, dtype, device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]


# --------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------


def _greedy_from_edges(n: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Greedy NMS outcome from suppression edges src -> dst (src ranks before dst).

    keep[j] = not any(keep[i] for edges i -> j). Iterating from all-True converges to the
    unique solution, which is the greedy one, in (longest chain + 1) rounds of one scatter.
    """
    keep = torch.ones(n, dtype=torch.bool, device=src.device)
    if src.numel() == 0:
        return keep
    while True:
        suppressed = torch.zeros(n, dtype=torch.bool, device=src.device)
        suppressed[dst[keep[src]]] = True
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def _overlap(a, b, mode: str):
    """IoU as torchvision computes it (mode "union"), or facenet-pytorch's nms_numpy 'Min'
    (intersection over the smaller area, with its +1 pixel convention)."""
    extra = 1.0 if mode == "min" else 0.0
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0]) + extra).clamp_(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1]) + extra).clamp_(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0] + extra) * (a[:, 3] - a[:, 1] + extra)
    area_b = (b[:, 2] - b[:, 0] + extra) * (b[:, 3] - b[:, 1] + extra)
    if mode == "min":
        return inter / torch.minimum(area_a, area_b)
    return inter / (area_a + area_b - inter)


_MAX_PAIRS_PER_CHUNK = 4_000_000


def _batched_nms(
    boxes, scores, groups, threshold: float, mode: str = "union", ties_last_first: bool = False
) -> torch.Tensor:
    """Greedy NMS independently within each group; returns the kept indices in priority
    order (score descending).

    Candidate pairs come from a sweep: within a group, boxes sorted by x1 can only overlap
    the following boxes whose x1 is left of their x2, so only those pairs are compared
    (vectorised, chunked). The greedy pass is `_greedy_from_edges`. Equal scores rank in
    input order, as torchvision's stable sort does; with ties_last_first the later box ranks
    first, as in facenet-pytorch's nms_numpy (np.argsort ascending, picked from the end).
    Ties matter: O-Net scores often saturate to exactly 1.0 for faces cut by the border.
    """
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if ties_last_first:
        reverse = torch.arange(n - 1, -1, -1, device=device)
        priority = reverse[torch.argsort(scores[reverse], descending=True, stable=True)]
    else:
        priority = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[priority] = torch.arange(n, device=device)
    boxes = boxes.float()
    # Sweep order: by group, then x1.
    sweep = torch.argsort(boxes[:, 0], stable=True)
    sweep = sweep[torch.argsort(groups[sweep], stable=True)]
    x1 = boxes[sweep, 0]
    x2 = boxes[sweep, 2] + (1.0 if mode == "min" else 0.0)  # 'min' counts touching pixels
    g = groups[sweep]
    # Keys that sort by group, then coordinate, as one float64 (groups are small ints).
    span = float((torch.maximum(x1.abs().max(), x2.abs().max()) * 2 + 4).item())
    key_start = g.double() * span + x1.double()
    key_end = g.double() * span + x2.double()
    end = torch.searchsorted(key_start, key_end, side="left")  # first box starting at/after x2
    position = torch.arange(n, device=device)
    partners = (end - position - 1).clamp_(min=0)
    cum_host = torch.cumsum(partners, 0).cpu().numpy()
    src_list, dst_list = [], []
    start = 0
    while start < n:
        base = int(cum_host[start - 1]) if start else 0
        stop = int(np.searchsorted(cum_host, base + _MAX_PAIRS_PER_CHUNK, side="right"))
        stop = min(max(stop, start + 1), n)
        counts = partners[start:stop]
        pairs = int(cum_host[stop - 1]) - base
        if pairs:
            first = torch.repeat_interleave(position[start:stop], counts, output_size=pairs)
            offsets = torch.cumsum(counts, 0) - counts
            second = first + 1 + torch.arange(pairs, device=device) - torch.repeat_interleave(
                offsets, counts, output_size=pairs
            )
            a, b = sweep[first], sweep[second]
            hit = _overlap(boxes[a], boxes[b], mode) > threshold
            a, b = a[hit], b[hit]
            a_first = rank[a] < rank[b]
            src_list.append(torch.where(a_first, rank[a], rank[b]))
            dst_list.append(torch.where(a_first, rank[b], rank[a]))
        start = stop
    if src_list:
        src, dst = torch.cat(src_list), torch.cat(dst_list)
    else:
        src = dst = torch.zeros(0, dtype=torch.long, device=device)
    return priority[_greedy_from_edges(n, src, dst)]


# --------------------------------------------------------------------------------------
# P-Net over packed canvases
# --------------------------------------------------------------------------------------


class _FastPNet(nn.Module):
    """P-Net with its first conv, PReLU and 2x2 ceil max-pool fused; same numbers.

    conv1 is evaluated at the four positions of each pooling window at once, as one stride-2
    4x4 conv with 40 output channels (group g = 2*dy + dx); PReLU runs on those channels and
    the pool is the max over the four groups. This avoids materialising and pooling the
    full-resolution conv1 output. The two 1x1 heads run as one 1x1 conv with 6 output
    channels (oneDNN runs it ~3x faster than the equivalent matrix product on the
    channels-last features, whose 6 output columns suit GEMM kernels badly).

    All weights are stored channels-last like the activations: the same numbers, and the
    convs measured a little faster with matching formats.
    """

    def __init__(self, pnet: PNet):
        super().__init__()
        w1, b1 = pnet.conv1.weight.detach(), pnet.conv1.bias.detach()
        fused = torch.zeros(4, 10, 3, 4, 4, dtype=w1.dtype, device=w1.device)
        for dy in range(2):
            for dx in range(2):
                fused[2 * dy + dx, :, :, dy : dy + 3, dx : dx + 3] = w1
        cl = torch.channels_last
        self.register_buffer("w1", fused.reshape(40, 3, 4, 4).contiguous(memory_format=cl))
        self.register_buffer("b1", b1.repeat(4))
        self.register_buffer("a1", pnet.prelu1.weight.detach().repeat(4))
        self.register_buffer("w2", pnet.conv2.weight.detach().contiguous(memory_format=cl).clone())
        self.register_buffer("b2", pnet.conv2.bias.detach().clone())
        self.register_buffer("a2", pnet.prelu2.weight.detach().clone())
        self.register_buffer("w3", pnet.conv3.weight.detach().contiguous(memory_format=cl).clone())
        self.register_buffer("b3", pnet.conv3.bias.detach().clone())
        self.register_buffer("a3", pnet.prelu3.weight.detach().clone())
        # Both heads as one 32 -> 6 1x1 conv: channels 0-1 face logits, 2-5 box regression.
        heads = torch.cat([pnet.conv4_1.weight, pnet.conv4_2.weight]).detach()
        self.register_buffer("wh", heads.contiguous(memory_format=cl).clone())
        self.register_buffer("bh", torch.cat([pnet.conv4_1.bias, pnet.conv4_2.bias]).detach())

    def forward(self, x, fix_rows=None, fix_cols=None):
        """x: (K, 3, H, W) normalised canvases (H, W even, channels-last preferred).
        fix_rows / fix_cols: flat indices of pooled positions whose window hangs one conv1
        row / column over the bottom / right edge of an odd-sized level; there the missing
        row (column) is replaced by its neighbour, so the max equals the reference's partial
        ceil-mode window.

        Returns the head outputs (K, h, w, 6): face logits (2), then box regression (4)."""
        # Temporaries are dropped as soon as the next one exists (`del`), so the peak is
        # about two full-size activations, not all of them (see MTCNNDetector's memory model).
        o = F.conv2d(x, self.w1, self.b1, stride=2)
        k, _, hp, wp = o.shape
        o = o.contiguous(memory_format=torch.channels_last)
        g = o.permute(0, 2, 3, 1).view(k * hp * wp, 4, 10)
        if fix_rows is not None and fix_rows.numel():
            g[fix_rows, 2:4] = g[fix_rows, 0:2]
        if fix_cols is not None and fix_cols.numel():
            g[fix_cols, 1] = g[fix_cols, 0]
            g[fix_cols, 3] = g[fix_cols, 2]
        del g
        act = F.prelu(o, self.a1)
        del o
        g = act.permute(0, 2, 3, 1).reshape(k * hp * wp, 4, 10)
        del act
        pairs = torch.maximum(g[:, 0:2], g[:, 2:4])
        del g
        pooled = torch.maximum(pairs[:, 0], pairs[:, 1])
        del pairs
        y = pooled.view(k, hp, wp, 10).permute(0, 3, 1, 2)  # channels-last memory
        del pooled
        y = F.prelu(F.conv2d(y, self.w2, self.b2), self.a2)
        y = F.prelu(F.conv2d(y, self.w3, self.b3), self.a3)
        head = F.conv2d(y, self.wh, self.bh)
        del y
        # channels-last memory: (K, h, w, 6) is a view, not a copy.
        return head.permute(0, 2, 3, 1)


@dataclass
class _Pieces:
    """Pieces of pyramid levels placed on canvases (arrays indexed by piece)."""

    level: np.ndarray  # level id
    in_row: np.ndarray  # first level row / column of the piece (even)
    in_col: np.ndarray
    height: np.ndarray  # piece size in level pixels
    width: np.ndarray
    out_rows: np.ndarray  # P-Net outputs the piece is responsible for
    out_cols: np.ndarray
    canvas: np.ndarray = None
    y: np.ndarray = None  # position on the canvas (even)
    x: np.ndarray = None


def _pnet_outputs(n: np.ndarray) -> np.ndarray:
    """P-Net output count along a side of n pixels: ceil((n - 2) / 2) - 4."""
    return (n - 1) // 2 - 4


def _tile_levels(level_h: np.ndarray, level_w: np.ndarray, max_h: int, max_w: int) -> _Pieces:
    """Split levels larger than a canvas into overlapping pieces. A piece owns a block of
    P-Net outputs and holds exactly the pixels they see (10 px of overlap between pieces); a
    piece that ends at an odd level edge keeps the level's last row/column for the partial
    ceil-mode pool window."""
    cols = {k: [] for k in ("level", "in_row", "in_col", "height", "width", "out_rows", "out_cols")}
    per_row = (max_h - 11) // 2
    per_col = (max_w - 11) // 2
    out_h, out_w = _pnet_outputs(level_h), _pnet_outputs(level_w)
    for lvl in range(len(level_h)):
        h, w, oh, ow = int(level_h[lvl]), int(level_w[lvl]), int(out_h[lvl]), int(out_w[lvl])
        for i0 in range(0, oh, per_row):
            n_r = min(per_row, oh - i0)
            r_end = h if i0 + n_r == oh else 2 * (i0 + n_r) + 10
            for j0 in range(0, ow, per_col):
                n_c = min(per_col, ow - j0)
                c_end = w if j0 + n_c == ow else 2 * (j0 + n_c) + 10
                cols["level"].append(lvl)
                cols["in_row"].append(2 * i0)
                cols["in_col"].append(2 * j0)
                cols["height"].append(r_end - 2 * i0)
                cols["width"].append(c_end - 2 * j0)
                cols["out_rows"].append(n_r)
                cols["out_cols"].append(n_c)
    return _Pieces(**{k: np.array(v, np.int64) for k, v in cols.items()})


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _shelf_pack(pieces: _Pieces, canvas_h: int, canvas_w: int, step: int) -> list[tuple[int, int]]:
    """Next-fit decreasing-height shelf packing of pieces onto canvases of at most
    canvas_h x canvas_w; fills pieces.canvas/y/x and returns each canvas's (height, width),
    rounded up to `step` (height) and 2 * `step` (width) so that few distinct shapes occur
    (oneDNN generates kernels per shape)."""
    n = len(pieces.level)
    heights = pieces.height + pieces.height % 2
    widths = pieces.width + pieces.width % 2
    order = np.argsort(-heights, kind="stable")
    canvas = np.zeros(n, np.int64)
    ys = np.zeros(n, np.int64)
    xs = np.zeros(n, np.int64)
    shapes: list[list[int]] = []
    shelf_y = shelf_x = shelf_h = 0
    current = -1
    for p in order:
        h, w = int(heights[p]), int(widths[p])
        if current < 0 or shelf_x + w > canvas_w:
            shelf_y, shelf_x = shelf_y + shelf_h, 0
            shelf_h = h
            if current < 0 or shelf_y + h > canvas_h:
                shapes.append([0, 0])
                current += 1
                shelf_y = 0
        canvas[p], ys[p], xs[p] = current, shelf_y, shelf_x
        shelf_x += w
        shapes[current][0] = max(shapes[current][0], shelf_y + shelf_h)
        shapes[current][1] = max(shapes[current][1], shelf_x)
    pieces.canvas, pieces.y, pieces.x = canvas, ys, xs
    return [
        (min(_round_up(h, step), max(canvas_h, h)), min(_round_up(w, 2 * step), max(canvas_w, w)))
        for h, w in shapes
    ]


# --------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Batch size rounded up to 4, 6, 8, 12, 16, 24, 32, 48, 64, ... (powers of two and 1.5x
    powers of two): oneDNN generates kernels per input shape, so a handful of sizes is
    reused instead of one per candidate count, for at most a third of padding. (From 32
    up, O-Net ran a photo's few crops padded to 32 at batch 1: 3.0 s of O-Net for the 153
    photos against 1.5 s from 4 up.)"""
    size = 4
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size // 3 * 4
    return size


class MTCNNDetector:
    """Batched MTCNN face detector; see the module docstring for the algorithm.

    ``detect(images)`` takes a list of HxWx3 uint8 RGB numpy arrays of any sizes and returns
    one :class:`Detections` per image. Grayscale (HxW, HxWx1) and RGBA (HxWx4) uint8 arrays are
    converted the way Pillow's ``convert('RGB')`` does (gray replicated, alpha dropped); any
    other dtype raises TypeError, any other shape ValueError. Images too small for one
    12x12 P-Net window at ``min_face_size`` give empty Detections.

    ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS` = 16 MP) caps the pixels processed
    per image: a bigger image is downscaled for detection and the results are mapped back to
    its own pixels. ``None`` processes every image at full resolution.

    Memory: each call plans its work from a byte budget: ``memory_budget_bytes`` (or the
    ``FACEBATCH_GPU_MEMORY_BYTES`` variable) when given, else on CUDA
    :data:`facebatch.gpumem.DEFAULT_FRACTION` of the device's free memory at the start of the
    call, else (CPU) no limit. Integral images cost :data:`INTEGRAL_BYTES_PER_PIXEL` per input
    pixel; a batch whose integrals would take more than half the budget is detected in groups
    of images. The rest of the budget sizes the P-Net calls (:data:`PNET_BYTES_PER_PIXEL` per
    canvas pixel, autocast included) and the R-Net / O-Net chunks
    (:data:`RNET_BYTES_PER_CROP`, :data:`ONET_BYTES_PER_CROP`, crop sampling included). If the
    device still runs out of memory, the call is halved and run again (``oom_retries``).
    Results do not depend on the grouping or chunking. ``last_calls`` counts the calls per
    stage of the last detect().

    Global settings: on CUDA the constructor turns TF32 off for cuBLAS and cuDNN
    (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, process
    wide), so that fp32 results match the CPU's; ``tf32=True`` leaves torch's settings as they
    are. Nothing else global is changed: the caller decides ``torch.set_num_threads``. On the
    CPU it keeps reusable buffers between calls (the integral images take 12 bytes per pixel of
    the largest batch seen); on CUDA every buffer is released at the end of the call. Calls
    are serialised by a lock: for parallelism use one detector per thread or process.
    """

    def __init__(
        self,
        device="cpu",
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        autocast: bool = False,
        canvas_size: tuple[int, int] | None = None,
        memory_budget_bytes: int | str | None = None,
        tf32: bool = False,
    ):
        if not (isinstance(min_face_size, (int, float)) and min_face_size > 0):
            raise ValueError("min_face_size must be a positive number")
        if not 0.0 < float(scale_factor) < 1.0:
            raise ValueError("scale_factor must be in (0, 1)")
        if len(thresholds) != 3:
            raise ValueError("thresholds must be three numbers (P-Net, R-Net, O-Net)")
        if max_pixels is not None and max_pixels < 144:
            raise ValueError("max_pixels must be at least 144 (12 x 12) or None")
        self.device = resolve_device(device)
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        # Autocast (fp16) is offered on CUDA only; on CPU fp16/bf16 convs are slower here.
        self.autocast = bool(autocast) and self.device.type == "cuda"
        on_gpu = self.device.type == "cuda"
        # P-Net canvas: small on CPU, so temporaries stay cache- and allocator-friendly; big on
        # GPU, where all canvases go in one call.
        if canvas_size is None:
            # 384 x 512 measured ~1.5x faster per pixel than 768 x 1024 on a 2-core Xeon
            # (the working set of one canvas stays closer to cache).
            canvas_size = (2048, 2048) if on_gpu else (384, 512)
        self.canvas_size = (int(canvas_size[0]), int(canvas_size[1]))
        if min(self.canvas_size) < 64 or self.canvas_size[0] % 2 or self.canvas_size[1] % 2:
            raise ValueError("canvas_size must be even and at least 64 x 64")
        # Canvas shapes are rounded up to this (heights) and twice this (widths) so that oneDNN
        # meets a bounded set of shapes (it generates kernels per shape). On the CPU, 32: at
        # 128 the rounding padded the 153-photo corpus's canvases by 22% (109 MP of canvas for
        # 89 MP of pieces) and P-Net spent that share on zeros; 32 cut P-Net by about 15% with
        # at most 96 shapes, and the first (kernel-generating) pass was no slower.
        self._canvas_step = 64 if on_gpu else 32
        self._chunk_elems = (1 << 24) if on_gpu else (1 << 20)
        # Memory: every call is sized from a byte budget (see the class docstring).
        self._explicit_budget = gpumem.explicit_budget(memory_budget_bytes)
        self.memory_fraction = gpumem.DEFAULT_FRACTION
        # GPU planning: all canvases (R-/O-Net crops) in as few calls as the budget allows.
        # The CPU keeps one small canvas (a cache-sized chunk of crops) per call; tests set
        # this on the CPU to run the GPU's planning there.
        self._gpu_planning = on_gpu
        self._oom = gpumem.OomCounter()
        self._uploads = UploadCounter()
        #: Calls per stage (and image groups, and host -> device transfers) of the last detect() call.
        self.last_calls: dict[str, int] = {}
        if on_gpu and not tf32:
            disable_tf32()

        paths = mtcnn_weight_paths()
        self.weights_sha256 = {name: sha256_file(path) for name, path in paths.items()}
        nets = load_mtcnn_weights(paths)
        self.pnet = nets["pnet"].to(self.device)
        self.rnet = nets["rnet"].to(self.device)
        self.onet = nets["onet"].to(self.device)
        self._fast_pnet = _FastPNet(self.pnet).to(self.device)
        # channels_last: oneDNN's fast path for these small convolutions on CPU (2-4x).
        self._rnet_fast = self.rnet.to(memory_format=torch.channels_last)
        self._onet_fast = self.onet.to(memory_format=torch.channels_last)
        self._workspace = _Workspace()
        self._lock = threading.Lock()
        self._calls = 0  # detect() calls so far (see detect: which sampler)
        self._compiled_samplers = False
        #: Seconds per stage of the last detect() call (on CUDA only when time_stages is
        #: set, because timing needs a synchronisation per stage).
        self.last_stage_seconds: dict[str, float] = {}
        self.time_stages = self.device.type == "cpu"

    # ---- public API --------------------------------------------------------------------

    @property
    def oom_retries(self) -> int:
        """Calls halved after an out-of-memory error, since construction."""
        return self._oom.retries

    @property
    def params(self) -> dict:
        """Parameters that change results (for the pipeline version)."""
        return {
            "detector": "mtcnn",
            "algorithm": "facenet-pytorch-2.5.3-detect_face",
            "min_face_size": self.min_face_size,
            "thresholds": list(self.thresholds),
            "scale_factor": self.scale_factor,
            "max_pixels": self.max_pixels,
            "autocast": self.autocast,
            "weights_sha256": dict(self.weights_sha256),
        }

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in a batch of images (see the class docstring for accepted input)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            raise TypeError("detect() takes a list of HxWx3 uint8 numpy arrays")
        if len(images) == 0:
            return []
        arrays = [_as_rgb_uint8(im, i, self.device) for i, im in enumerate(images)]
        back_scale = np.ones((len(arrays), 2), np.float64)
        if self.max_pixels is not None:
            import cv2

            for i, im in enumerate(arrays):
                h, w = im.shape[:2]
                if h * w > self.max_pixels:
                    if isinstance(im, torch.Tensor):  # rare (callers decode at most max_side)
                        im = im.cpu().numpy()
                    f = math.sqrt(self.max_pixels / (h * w))
                    nh, nw = max(1, int(h * f)), max(1, int(w * f))
                    arrays[i] = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_AREA)
                    back_scale[i] = (w / nw, h / nh)
        with self._lock, torch.inference_mode():
            # The CPU's compiled samplers (area_kernels) from the second call on: setting numba up
            # costs about 1.2 CPU-seconds per process even with its machine code cached, which
            # made the first call (a run's first results, a command's only batch) slower; the
            # torch expressions give the same float32 bits, and the compiled loops are faster for
            # every later call (bench/bench_first_call.py, figures in the README).
            self._compiled_samplers = self._calls > 0
            if self._calls == 1 and not self._gpu_planning:
                # From now on the host integrals are sampled by the compiled loops: the torch
                # sampler's chunk buffers (`_IntegralImages.sample_grid`) are not used again.
                self._workspace.drop(*_TORCH_SAMPLER_BUFFERS)
            self._calls += 1
            self.last_stage_seconds = {}
            self.last_calls = {"groups": 0, "pnet": 0, "rnet": 0, "onet": 0, "uploads": 0}
            uploads_before = self._uploads.count
            self._clock = time.perf_counter()
            budget = gpumem.call_budget(self.device, self._explicit_budget, self.memory_fraction)
            parts = []
            try:
                for lo, hi in self._image_groups(arrays, budget):
                    self.last_calls["groups"] += 1
                    boxes, scores, points, image_ids = self._cascade(arrays[lo:hi], budget)
                    parts.append((boxes, scores, points, image_ids + lo))
            finally:
                self.last_calls["uploads"] = self._uploads.count - uploads_before
                if self.device.type == "cuda":
                    self._workspace.clear()
            boxes, scores, points, image_ids = (torch.cat(column) for column in zip(*parts))
        return _split(boxes, scores, points, image_ids, len(arrays), back_scale)

    def _image_groups(self, images: list[np.ndarray], budget: int | None) -> list[tuple[int, int]]:
        """Consecutive groups of images whose integral images take at most half the budget
        (each group goes through the cascade on its own; one image is always one group)."""
        if budget is None:
            return [(0, len(images))]
        limit = budget * _INTEGRAL_SHARE
        groups, start, used = [], 0, 0
        for i, im in enumerate(images):
            need = _integral_bytes(im.shape[0], im.shape[1])
            if self._gpu_planning and not isinstance(im, torch.Tensor):
                need += int(im.shape[0]) * int(im.shape[1]) * 3  # its pixels, uploaded with the group
            if i > start and used + need > limit:
                groups.append((start, i))
                start, used = i, 0
            used += need
        groups.append((start, len(images)))
        return groups

    def _left_after_integral(self, budget: int | None, integral: "_IntegralImages") -> int | None:
        """Bytes of the budget left for one network call once the integral images exist."""
        if budget is None:
            return None
        return max(0, budget - int(integral.flat.numel()) * 4)

    def _mark(self, stage: str) -> None:
        """Charge the time since the previous mark to `stage`."""
        if not self.time_stages:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.last_stage_seconds[stage] = self.last_stage_seconds.get(stage, 0.0) + now - self._clock
        self._clock = now

    # ---- cascade -----------------------------------------------------------------------

    def _pyramid(self, h: int, w: int) -> list[float]:
        # Same Python-float arithmetic as facenet-pytorch.
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales, scale = [], m
        while minl >= 12:
            scales.append(scale)
            scale = scale * self.scale_factor
            minl = minl * self.scale_factor
        return scales

    def _cascade(self, images: list[np.ndarray], budget: int | None = None):
        dev = self.device
        empty = (
            torch.zeros((0, 4)),
            torch.zeros(0),
            torch.zeros((0, 5, 2)),
            torch.zeros(0, dtype=torch.long),
        )
        level_image, level_scale, level_h, level_w = [], [], [], []
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            for s in self._pyramid(h, w):
                level_image.append(i)
                level_scale.append(s)
                level_h.append(int(h * s + 1))
                level_w.append(int(w * s + 1))
        if not level_image:
            return empty
        levels = {
            "image": np.array(level_image, np.int64),
            "scale": np.array(level_scale, np.float64),
            "h": np.array(level_h, np.int64),
            "w": np.array(level_w, np.int64),
        }
        integral = _IntegralImages(images, dev, self._workspace, on_device=self._gpu_planning, uploads=self._uploads,
                                   compiled=self._compiled_samplers)
        left = self._left_after_integral(budget, integral)
        img_h, img_w = integral.heights_t, integral.widths_t
        self._mark("integral")

        # ---- stage 1: P-Net ----
        cand, image_ids, cand_level = self._stage_pnet(integral, levels, left)
        if cand.shape[0] == 0:
            return empty
        # NMS 0.5 within image and level, then 0.7 within image (on the unregressed windows).
        self._mark("pnet")
        keep = _batched_nms(cand[:, :4], cand[:, 4], cand_level, 0.5)
        cand, image_ids = cand[keep], image_ids[keep]
        keep = _batched_nms(cand[:, :4], cand[:, 4], image_ids, 0.7)
        cand, image_ids = cand[keep], image_ids[keep]
        regw = cand[:, 2] - cand[:, 0]
        regh = cand[:, 3] - cand[:, 1]
        boxes = torch.stack(
            [cand[:, 0] + cand[:, 5] * regw, cand[:, 1] + cand[:, 6] * regh,
             cand[:, 2] + cand[:, 7] * regw, cand[:, 3] + cand[:, 8] * regh],
            dim=1,
        )
        boxes = _rerec(boxes)
        self._mark("pnet_nms")

        # ---- stage 2: R-Net over the candidates of all images at once ----
        sample, n_crops, valid = self._crops(integral, boxes, image_ids, img_h, img_w, 24)
        boxes, image_ids = boxes[valid], image_ids[valid]
        if n_crops == 0:
            return empty
        reg, prob = self._run_net(self._rnet_fast, sample, n_crops, 256, left, RNET_BYTES_PER_CROP, "rnet")
        del sample
        self._mark("rnet")
        score = prob[:, 1]
        passed = score > self.thresholds[1]
        boxes, image_ids, score, reg = boxes[passed], image_ids[passed], score[passed], reg[passed]
        keep = _batched_nms(boxes, score, image_ids, 0.7)
        boxes, image_ids, reg = boxes[keep], image_ids[keep], reg[keep]
        boxes = _rerec(_bbreg(boxes, reg))
        self._mark("rnet_nms")
        if boxes.shape[0] == 0:
            return empty

        # ---- stage 3: O-Net ----
        sample, n_crops, valid = self._crops(integral, boxes, image_ids, img_h, img_w, 48)
        boxes, image_ids = boxes[valid], image_ids[valid]
        if n_crops == 0:
            return empty
        reg, marks, prob = self._run_net(self._onet_fast, sample, n_crops, 64, left, ONET_BYTES_PER_CROP, "onet")
        del sample, integral
        self._mark("onet")
        score = prob[:, 1]
        passed = score > self.thresholds[2]
        boxes, image_ids, score, reg, marks = boxes[passed], image_ids[passed], score[passed], reg[passed], marks[passed]
        w_i = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h_i = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack(
            [w_i * marks[:, :5] + boxes[:, 0:1] - 1, h_i * marks[:, 5:10] + boxes[:, 1:2] - 1], dim=2
        )
        boxes = _bbreg(boxes, reg)
        keep = _batched_nms(boxes, score, image_ids, 0.7, mode="min", ties_last_first=True)
        result = boxes[keep].cpu(), score[keep].cpu(), points[keep].cpu(), image_ids[keep].cpu()
        self._mark("onet_nms")
        return result

    def _run_net(self, net, sample, n: int, cpu_chunk: int, left: int | None, bytes_per_crop: int, stage: str):
        """One pass of R-/O-Net over the crops of every image; sample(start, stop) cuts crops
        [start, stop). With GPU planning the calls are as large as the budget allows
        (`left` / `bytes_per_crop` crops, all of them when there is no budget); on CPU the
        crops are cut and run in chunks of `cpu_chunk` (3x faster per crop than one huge
        call, because index tensors and activations stay in cache), the last chunk padded to
        a bucket size so oneDNN reuses its kernels. Out of memory halves the chunk. Outputs
        are float32."""
        fits = n if left is None else max(1, left // bytes_per_crop)
        gpu = self._gpu_planning

        def call(start: int, stop: int):
            chunk = sample(start, stop)
            size = chunk.shape[0]
            if not gpu:
                padded = cpu_chunk if size == cpu_chunk else min(_bucket(size), cpu_chunk)
                if padded != size:
                    chunk = torch.cat([chunk, chunk.new_zeros((padded - size,) + chunk.shape[1:])])
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", enabled=self.autocast):
                return [o[:size].float() for o in net(chunk)]

        def counted():
            self.last_calls[stage] += 1

        outputs = gpumem.run_chunked(call, n, min(fits, n if gpu else cpu_chunk), counter=self._oom,
                                     device=self.device, what=f"detector {stage}", on_call=counted)
        if len(outputs) == 1:
            return tuple(outputs[0])
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def _stage_pnet(self, integral: _IntegralImages, levels: dict, left: int | None = None):
        """P-Net over every level of every image. Returns candidates (N, 9): window x1, y1,
        x2, y2 (facenet's generateBoundingBox), score, 4 regression values; their image and
        their level."""
        dev = self.device
        max_h, max_w = self.canvas_size
        pieces = _tile_levels(levels["h"], levels["w"], max_h, max_w)
        shapes = _shelf_pack(pieces, max_h, max_w, self._canvas_step)
        per_call = 1
        chunk_elems = self._chunk_elems
        if self._gpu_planning:
            # All canvases padded to a common shape, in as few P-Net calls as the budget
            # allows (the pyramid sampler's chunk buffers come out of the same budget).
            common = (max(s[0] for s in shapes), max(s[1] for s in shapes))
            shapes = [common] * len(shapes)
            per_call = len(shapes)
            if left is not None:
                chunk_elems = max(1 << 16, min(chunk_elems, left // _SAMPLER_BYTES_PER_ELEM // 4))
                pnet_bytes = max(0, left - chunk_elems * _SAMPLER_BYTES_PER_ELEM)
                per_call = max(1, pnet_bytes // (PNET_BYTES_PER_PIXEL * common[0] * common[1]))
        piece_ids_by_canvas = [np.nonzero(pieces.canvas == c)[0] for c in range(len(shapes))]
        tables = _PNetTables(integral.shapes, levels, pieces, shapes, piece_ids_by_canvas, dev, self._uploads)

        def call(start: int, stop: int):
            group = list(range(start, stop))
            hc, wc = shapes[start]
            if dev.type == "cuda":
                batch = torch.zeros((len(group), hc, wc, 3), dtype=torch.float32, device=dev)
            else:  # reused on the CPU: a fresh buffer costs page faults every call
                # One buffer for every canvas shape (grow-only, viewed per shape): with canvases in
                # 32-px steps a buffer per shape would keep up to 96 of them for the actor's life.
                batch = self._workspace.get("canvas", len(group) * hc * wc * 3, torch.float32, dev)
                batch = batch.view(len(group), hc, wc, 3)
                batch.zero_()
            canvas_values = hc * wc * 3
            for k, c in enumerate(group):
                for p in piece_ids_by_canvas[c]:
                    p = int(p)
                    y, x = int(pieces.y[p]), int(pieces.x[p])
                    image = int(levels["image"][pieces.level[p]])
                    if not integral.compiled:
                        h, w = int(pieces.height[p]), int(pieces.width[p])
                        integral.sample_grid(image, tables.bins[p], batch[k, y : y + h, x : x + w], chunk_elems)
                    else:
                        integral.sample_grid_host(image, tables.host_bins[p], batch,
                                                  k * canvas_values + (y * wc + x) * 3, wc * 3)
            fix_rows, fix_cols = tables.window_fixes(group, hc, wc)
            self._mark("pyramid")
            with torch.autocast("cuda", enabled=self.autocast):
                head = self._fast_pnet(batch.permute(0, 3, 1, 2), fix_rows, fix_cols)
            del batch
            self._mark("pnet")
            return self._candidates(head, pieces, group, piece_ids_by_canvas, levels, tables)

        def counted():
            self.last_calls["pnet"] += 1

        found = gpumem.run_chunked(call, len(shapes), per_call, counter=self._oom, device=dev,
                                   what="detector pnet", on_call=counted)
        found_boxes = [f[0] for f in found if f[0] is not None]
        found_levels = [f[1] for f in found if f[0] is not None]
        found_keys = [f[2] for f in found if f[0] is not None]
        if not found_boxes:
            none = torch.zeros(0, dtype=torch.long, device=dev)
            return torch.zeros((0, 9), device=dev), none, none
        order = torch.argsort(torch.cat(found_keys))
        cand_level = torch.cat(found_levels)[order]
        return torch.cat(found_boxes)[order], tables.level_image[cand_level], cand_level

    def _candidates(self, head, pieces, group, piece_ids_by_canvas, levels, tables: "_PNetTables"):
        """Windows with face probability >= threshold inside a piece's own output block.

        The softmax is evaluated only where the logit difference comes within a margin of
        the threshold (a superset), then compared exactly as the reference does."""
        dev = self.device
        k_count, oh, ow, _ = head.shape
        owner = torch.full((k_count, oh, ow), -1, dtype=torch.int64, device=dev)
        for k, c in enumerate(group):
            for p in piece_ids_by_canvas[c]:
                y, x = int(pieces.y[p]) // 2, int(pieces.x[p]) // 2
                owner[k, y : y + int(pieces.out_rows[p]), x : x + int(pieces.out_cols[p])] = int(p)
        threshold = self.thresholds[0]
        margin_logit = math.log(threshold / (1.0 - threshold)) - 0.01 if 0.0 < threshold < 1.0 else -math.inf
        head = head.float()
        near = ((head[..., 1] - head[..., 0]) >= margin_logit) & (owner >= 0)
        ks, ys, xs = torch.nonzero(near, as_tuple=True)
        logits = head[ks, ys, xs]
        score = torch.softmax(logits[:, 0:2], dim=1)[:, 1]
        hit = score >= threshold
        ks, ys, xs, score, logits = ks[hit], ys[hit], xs[hit], score[hit], logits[hit]
        if ys.numel() == 0:
            return None, None, None
        piece = owner[ks, ys, xs]
        pt = {name: column[piece] for name, column in tables.pieces.items()}
        # Output coordinates within the level (what facenet's generateBoundingBox sees).
        by = (ys - pt["y"] // 2 + pt["in_row"] // 2).to(torch.float32)
        bx = (xs - pt["x"] // 2 + pt["in_col"] // 2).to(torch.float32)
        scale = tables.level_scale[pt["level"]].to(torch.float32)
        # facenet: q1 = floor((stride*bb + 1) / scale), q2 = floor((stride*bb + cell) / scale)
        # on float32 tensors.
        q1x = torch.floor((_PNET_STRIDE * bx + 1) / scale)
        q1y = torch.floor((_PNET_STRIDE * by + 1) / scale)
        q2x = torch.floor((_PNET_STRIDE * bx + _PNET_CELL) / scale)
        q2y = torch.floor((_PNET_STRIDE * by + _PNET_CELL) / scale)
        boxes = torch.cat([torch.stack([q1x, q1y, q2x, q2y, score], 1), logits[:, 2:6]], 1)
        # facenet-pytorch lists a level's candidates in row-major order; keep that order
        # (it decides ties in NMS) although pieces split a level on the canvases.
        key = (pt["level"] * (int(levels["h"].max()) + 1) + by.long()) * (int(levels["w"].max()) + 1) + bx.long()
        return boxes, pt["level"], key

    def _crops(self, integral, boxes, image_ids, img_h, img_w, size: int):
        """facenet-pytorch's pad + crop + area resize, for every box at once.

        Returns a sampler (start, stop) -> normalised crops (n, 3, size, size) in
        channels-last memory, the number of crops, and the mask of boxes whose clamped
        region is not empty (the reference skips those)."""
        b = boxes.trunc().to(torch.int64)
        x = b[:, 0].clamp(min=1)
        y = b[:, 1].clamp(min=1)
        ex = torch.minimum(b[:, 2], img_w[image_ids])
        ey = torch.minimum(b[:, 3], img_h[image_ids])
        valid = (ey > y - 1) & (ex > x - 1)
        x, y, ex, ey, ids = x[valid], y[valid], ex[valid], ey[valid], image_ids[valid]
        rs, re = _bins(y - 1, ey - y + 1, size, self.device)
        cs, ce = _bins(x - 1, ex - x + 1, size, self.device)

        def sample(start: int, stop: int) -> torch.Tensor:
            crops = integral.sample_boxes(ids[start:stop], rs[start:stop], re[start:stop], cs[start:stop], ce[start:stop])
            return crops.permute(0, 3, 1, 2)

        return sample, int(x.shape[0]), valid


@dataclass
class _GridBins:
    """The area bins of one canvas piece: rows [rs, re) x columns [cs, ce) of its image
    (device tensors), the columns as ``col_ends`` = (cs, ce) - c_lo, bin sizes in float32."""

    rows: int
    cols: int
    c_lo: int
    c_hi: int
    rs: torch.Tensor
    re: torch.Tensor
    col_ends: torch.Tensor
    kh: torch.Tensor
    kw: torch.Tensor


class _PNetTables:
    """Everything the P-Net stage reads on the device, built on the host and sent in one
    transfer (facebatch.staging): every piece's pyramid bins, the piece and level tables that
    map P-Net outputs back to images, and the partial-window fixes of every canvas. Per-piece
    uploads would each wait for the GPU's queue (a pageable copy synchronises the stream)."""

    _PIECE_COLUMNS = ("level", "in_row", "in_col", "y", "x")

    def __init__(self, image_shapes, levels: dict, pieces: "_Pieces", shapes, piece_ids_by_canvas, device,
                 uploads: UploadCounter | None):
        rs_parts, re_parts, col_parts, kh_parts, kw_parts, spans = [], [], [], [], [], []
        # The same bins on the host, per piece, for the CPU's compiled sampler (area_kernels).
        self.host_bins: list[tuple[np.ndarray, ...]] = []
        level_bins: dict[int, tuple] = {}
        row_at = col_at = 0
        for p in range(len(pieces.level)):
            lvl = int(pieces.level[p])
            if lvl not in level_bins:
                ih, iw = image_shapes[int(levels["image"][lvl])]
                level_bins[lvl] = (*_bins_np(ih, int(levels["h"][lvl])), *_bins_np(iw, int(levels["w"][lvl])))
            rs, re, cs, ce = level_bins[lvl]
            r0, c0 = int(pieces.in_row[p]), int(pieces.in_col[p])
            h, w = int(pieces.height[p]), int(pieces.width[p])
            rs, re, cs, ce = rs[r0 : r0 + h], re[r0 : r0 + h], cs[c0 : c0 + w], ce[c0 : c0 + w]
            c_lo, c_hi = int(cs[0]), int(ce[-1]) + 1
            rs_parts.append(rs)
            re_parts.append(re)
            col_parts.append(np.concatenate([cs, ce]) - c_lo)
            kh_parts.append((re - rs).astype(np.float32))
            kw_parts.append((ce - cs).astype(np.float32))
            self.host_bins.append((rs, re, cs, ce, kh_parts[-1], kw_parts[-1]))
            spans.append((row_at, col_at, h, w, c_lo, c_hi))
            row_at, col_at = row_at + h, col_at + w
        # Partial ceil-mode pool windows: flat pooled-grid indices within each canvas (the
        # call adds its canvas's position in the call's batch).
        fix_rows, fix_cols, self._fix_spans = [], [], []
        rows_at = cols_at = 0
        for c, piece_ids in enumerate(piece_ids_by_canvas):
            hc, wc = shapes[c]
            wp = wc // 2 - 1
            n_rows = n_cols = 0
            for p in piece_ids:
                h, w = int(pieces.height[p]), int(pieces.width[p])
                py, px = int(pieces.y[p]) // 2, int(pieces.x[p]) // 2
                n_r, n_c = (h - 1) // 2, (w - 1) // 2  # pooled rows / columns of the piece
                if h % 2:
                    fix_rows.append((py + n_r - 1) * wp + px + np.arange(n_c))
                    n_rows += n_c
                if w % 2:
                    fix_cols.append((py + np.arange(n_r)) * wp + px + n_c - 1)
                    n_cols += n_r
            self._fix_spans.append((rows_at, n_rows, cols_at, n_cols))
            rows_at, cols_at = rows_at + n_rows, cols_at + n_cols

        def joined(parts, dtype):
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        upload = Upload(device, uploads)
        for array in (joined(rs_parts, np.int64), joined(re_parts, np.int64), joined(col_parts, np.int64),
                      joined(kh_parts, np.float32), joined(kw_parts, np.float32),
                      joined(fix_rows, np.int64), joined(fix_cols, np.int64),
                      levels["scale"], levels["image"], *(getattr(pieces, n) for n in self._PIECE_COLUMNS)):
            upload.add(array)
        sent = upload.send()
        rs_all, re_all, cols_all, kh_all, kw_all, self._fix_rows, self._fix_cols = sent[:7]
        self.level_scale, self.level_image = sent[7], sent[8]
        self.pieces = dict(zip(self._PIECE_COLUMNS, sent[9:]))
        self.bins = [
            _GridBins(h, w, c_lo, c_hi, rs_all[r : r + h], re_all[r : r + h], cols_all[2 * c : 2 * c + 2 * w],
                      kh_all[r : r + h], kw_all[c : c + w])
            for r, c, h, w, c_lo, c_hi in spans
        ]

    def window_fixes(self, group, hc: int, wc: int):
        """fix_rows / fix_cols of `_FastPNet` for the canvases `group`, batched in that order."""
        per_canvas = (hc // 2 - 1) * (wc // 2 - 1)
        rows, cols = [], []
        for k, c in enumerate(group):
            rows_at, n_rows, cols_at, n_cols = self._fix_spans[c]
            if n_rows:
                part = self._fix_rows[rows_at : rows_at + n_rows]
                rows.append(part + k * per_canvas if k else part)
            if n_cols:
                part = self._fix_cols[cols_at : cols_at + n_cols]
                cols.append(part + k * per_canvas if k else part)
        fix_rows = (torch.cat(rows) if len(rows) > 1 else rows[0]) if rows else None
        fix_cols = (torch.cat(cols) if len(cols) > 1 else cols[0]) if cols else None
        return fix_rows, fix_cols


def _split(boxes, scores, points, image_ids, n_images, back_scale) -> list[Detections]:
    boxes = boxes.float().numpy()
    scores = scores.float().numpy()
    points = points.float().numpy()
    image_ids = image_ids.numpy()
    order = np.lexsort((-scores, image_ids))
    boxes, scores, points, image_ids = boxes[order], scores[order], points[order], image_ids[order]
    bounds = np.searchsorted(image_ids, np.arange(n_images + 1))
    results = []
    for i in range(n_images):
        lo, hi = bounds[i], bounds[i + 1]
        bx = boxes[lo:hi].astype(np.float32)
        pt = points[lo:hi].astype(np.float32)
        sx, sy = back_scale[i]
        if sx != 1.0 or sy != 1.0:
            bx = bx * np.array([sx, sy, sx, sy], np.float32)
            pt = pt * np.array([sx, sy], np.float32)
        results.append(Detections(np.ascontiguousarray(bx), scores[lo:hi].astype(np.float32).copy(), np.ascontiguousarray(pt)))
    return results


def _rerec(boxes):
    """Square boxes around their centre (facenet-pytorch's rerec), in float32."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _bbreg(boxes, reg):
    """facenet-pytorch's bbreg: regression relative to width/height with the +1 convention."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return torch.stack(
        [boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
         boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h],
        dim=1,
    )
