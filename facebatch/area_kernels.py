"""Area averages from an integral image, compiled for the CPU (numba).

The detector's pyramid levels and R-/O-Net crops are adaptive-average-pooling bins of the
image (what facenet-pytorch's ``F.interpolate(mode="area")`` computes). On the CPU, torch
can only express them as chains of whole-array gathers and arithmetic (gather the bins' rows
over the full width, subtract, gather the columns, subtract, divide twice, normalise): about
nine passes over memory per level, which made the pyramid a quarter of the detector's time.
These loops read the four corners of each bin once and write the normalised mean straight
into the P-Net canvas or the crop batch.

Deliberately hand-written (no library computes overlapping adaptive-pool bins from an
integral image), and bit-identical to the torch expressions they replace, which the tests
check: the corner differences wrap around in int32 exactly like the int32 tensors (see
``detector._IntegralImages``), and the mean is ``float32(sum) / rows / cols``, then
``(mean - 127.5) * 0.0078125``, each step rounded to float32 as torch rounds it (no
fast-math, so nothing is contracted or reordered).

They run on the calling thread: split over two threads they measured no faster on 2 cores
(torch's OpenMP threads still spin on the second core after each convolution). Compiled code
is cached next to this file (or in NUMBA_CACHE_DIR, or the user's cache directory), so a worker
pays the compilation once per machine, not once per process; see `_jit` for read-only installs.
Even from that cache, numba's import and first call cost about 1.2 CPU-seconds per process, so
the detector uses these loops from its second call on (see `MTCNNDetector.detect`).
"""

from __future__ import annotations

import numba
import numpy as np

_MEAN = np.float32(127.5)
_SCALE = np.float32(0.0078125)


def _jit(**options):
    """numba.njit with its on-disk cache where a cache directory can be written. Where none can
    (a read-only install without a writable HOME or NUMBA_CACHE_DIR), numba refuses ``cache=True``
    when the module is imported; the loops are then compiled once per process instead."""

    def wrap(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError as exc:
            if "no locator available" not in str(exc):
                raise
            return numba.njit(**options)(function)

    return wrap


@_jit(nogil=True, boundscheck=False, inline="always")
def _bin_mean(flat, top, bottom, left, right, rows, cols):
    """The normalised mean of one bin and channel: top / bottom are the flat positions of the
    channel's value in the integral rows above and at the bin's end, left / right the column
    offsets (3 per pixel), rows / cols the bin's size as float32."""
    total = np.int32(flat[bottom + right] - flat[top + right] - flat[bottom + left] + flat[top + left])
    mean = np.float32(total) / rows
    mean = mean / cols
    return (mean - _MEAN) * _SCALE


@_jit(nogil=True, boundscheck=False)
def area_grid(flat, base, row_stride, rs, re, cs, ce, kh, kw, out, out_base, out_row_stride):
    """Normalised area means of one image over a grid of bins, into a piece of a canvas.

    flat: integrals (int32, rows of ``row_stride`` values, 3 per pixel), the image's starting
    at ``base``; bins: rows [rs[i], re[i]) x columns [cs[j], ce[j]) of the image (int64),
    their heights / widths kh / kw as float32; out: flat float32 (H, W, 3) canvases, the
    piece's first value at ``out_base``, its rows ``out_row_stride`` apart. Everything is
    passed flat so that one compiled signature serves every piece."""
    for i in range(rs.shape[0]):
        top = base + rs[i] * row_stride
        bottom = base + re[i] * row_stride
        rows = kh[i]
        at = out_base + i * out_row_stride
        for j in range(cs.shape[0]):
            left, right = cs[j] * 3, ce[j] * 3
            cols = kw[j]
            for ch in range(3):
                out[at + 3 * j + ch] = _bin_mean(flat, top + ch, bottom + ch, left, right, rows, cols)


@_jit(nogil=True, boundscheck=False)
def area_boxes(flat, offsets, row_strides, image_ids, rs, re, cs, ce, out):
    """Normalised area means over per-item bins (the R-/O-Net crops).

    flat: every image's integral, concatenated (int32); offsets / row_strides: where image k
    starts in it and its row stride (int64); item n reads image image_ids[n] over rows
    [rs[n, i], re[n, i]) x columns [cs[n, j], ce[n, j]); out: (N, R, C, 3) float32."""
    for n in range(image_ids.shape[0]):
        k = image_ids[n]
        base, stride = offsets[k], row_strides[k]
        for i in range(rs.shape[1]):
            top = base + rs[n, i] * stride
            bottom = base + re[n, i] * stride
            rows = np.float32(re[n, i] - rs[n, i])
            for j in range(cs.shape[1]):
                left, right = cs[n, j] * 3, ce[n, j] * 3
                cols = np.float32(ce[n, j] - cs[n, j])
                for ch in range(3):
                    out[n, i, j, ch] = _bin_mean(flat, top + ch, bottom + ch, left, right, rows, cols)

