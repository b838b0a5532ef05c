"""JPEG decoding on the GPU (nvJPEG, through torchvision) for the CUDA inference actors.

With ``--gpu-jpeg-decode`` the read tasks do not decode the JPEGs that nvJPEG can take (complete
baseline RGB or grey files within the pixel limit, :func:`facebatch.decode.plan_jpeg`): they pass
the file's bytes on, about a tenth of the decoded pixels' size in Ray's object store, and the actor
decodes its batch's JPEGs in one batched nvJPEG call on its GPU. Everything else (progressive,
CMYK, PNG, HEIC, damaged files, ...) is decoded on the CPU by :func:`facebatch.decode.decode_image`
as before, in the read task; a file nvJPEG refuses is decoded by it too, in the actor, so a bad
file still becomes an error row with the CPU decoder's status and message.

The result means what the CPU decoder's does: the EXIF orientation is applied the same way
(:func:`orient`), and where ``max_side`` lets the CPU decoder use libjpeg's DCT scaling (1/2, 1/4,
1/8) the full-size pixels are averaged over the same factor (:func:`reduce`), to the same array
size. The pixels are not bit-identical (nvJPEG's IDCT and upsampling differ from libjpeg's, and DCT
scaling is not exactly a box average), which is why this mode is a different pipeline version and
why ``bench/gpu_check.py`` measures the pixel and detection parity against the CPU decoder.

torchvision is an optional GPU extra (``pip install facebatch[gpu]``; present on the CUDA images);
it is imported only here, only when the mode is asked for.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .decode import DEFAULT_MAX_PIXELS, JpegPlan, plan_jpeg

log = logging.getLogger("facebatch")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Stored HxWxC pixels -> display pixels for EXIF ``orientation`` (the semantics of
    PIL.ImageOps.exif_transpose and facebatch.decode._apply_orientation). Returns a view."""
    if orientation == 2:
        return image.flip(1)
    if orientation == 3:
        return image.flip(0).flip(1)
    if orientation == 4:
        return image.flip(0)
    if orientation == 5:
        return image.transpose(0, 1)
    if orientation == 6:  # 90 degrees clockwise
        return image.transpose(0, 1).flip(1)
    if orientation == 7:
        return image.transpose(0, 1).flip(0).flip(1)
    if orientation == 8:  # 90 degrees counter-clockwise
        return image.transpose(0, 1).flip(0)
    return image


#: Rows of full-size pixels averaged per step of `reduce` (bounds its float32 temporaries to
#: about 12 bytes x this x the width: 100 MB for a 4,000-pixel-wide photo).
_REDUCE_ROWS = 2048


def reduce(image: torch.Tensor, factor: int) -> torch.Tensor:
    """HxWx3 uint8 averaged over factor x factor blocks to ceil(H/f) x ceil(W/f), the array size
    libjpeg's DCT scaling gives (edge blocks average the pixels they have). In strips of rows,
    so that a 100-MP photo does not need a 1.2 GB float copy on the device."""
    if factor == 1:
        return image
    h, w, _ = image.shape
    out = torch.empty((-(-h // factor), -(-w // factor), 3), dtype=torch.uint8, device=image.device)
    step = max(factor, _REDUCE_ROWS // factor * factor)
    for r0 in range(0, h, step):
        chw = image[r0 : r0 + step].permute(2, 0, 1)[None].float()
        pooled = F.avg_pool2d(chw, factor, stride=factor, ceil_mode=True, count_include_pad=False)
        out[r0 // factor : r0 // factor + pooled.shape[2]] = pooled[0].round_().clamp_(0, 255).permute(1, 2, 0)
    return out


def finish(image_chw: torch.Tensor, plan: JpegPlan) -> torch.Tensor:
    """A decoded 3xHxW image -> the C-contiguous HxWx3 array the CPU decoder would give."""
    return orient(reduce(image_chw.permute(1, 2, 0), plan.factor), plan.orientation).contiguous()


class NvJpegUnavailable(RuntimeError):
    """--gpu-jpeg-decode was asked for where nvJPEG cannot run (no CUDA, or no torchvision)."""


#: Decoded bytes (stored width x height x 3) per nvJPEG call: a batch of big photos is decoded in
#: several calls, so the full-size images of one call never need more than this at once.
NVJPEG_CALL_BYTES = 1 << 30


def nvjpeg_batch_decoder(device: torch.device | str) -> Callable[[Sequence[bytes]], list[torch.Tensor | None]]:
    """A function that decodes a list of JPEG files with nvJPEG on ``device`` (3xHxW uint8
    tensors there, RGB; None for a file nvJPEG refused). Raises NvJpegUnavailable with the
    reason when that cannot work here."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise NvJpegUnavailable(f"--gpu-jpeg-decode needs CUDA inference actors; this actor runs on {device}")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # not installed, or built for another torch
        raise NvJpegUnavailable(
            f"--gpu-jpeg-decode needs torchvision (the 'gpu' extra) in the actors' Python: {type(exc).__name__}: {exc}"
        ) from exc
    from .gpumem import is_fatal_device_error, is_oom, release_cached

    def call(inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One batched call; a failing call is split in halves to find the files nvJPEG
        refuses (one bad file fails the whole call), so a batch costs few calls."""
        try:
            # nvJPEG writes on its own stream into memory allocated on the current one: let
            # the current stream's queued work finish with whatever it frees first.
            torch.cuda.current_stream(device).synchronize()
            return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            if is_fatal_device_error(exc):
                raise
            if is_oom(exc):
                release_cached(device)
            if len(inputs) == 1:
                return [None]
            # An error that poisoned the context surfaces here, before more work is queued.
            torch.cuda.synchronize(device)
        half = len(inputs) // 2
        return call(inputs[:half]) + call(inputs[half:])

    def decode(files: Sequence[bytes]) -> list[torch.Tensor | None]:
        return call([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]) if files else []

    return decode


def opencv_batch_decode(files: Sequence[bytes]) -> list[torch.Tensor | None]:
    """libjpeg (through OpenCV) behind nvJPEG's interface: stored orientation, full size, 3xHxW
    uint8 on the CPU; None for a file it cannot read. The reference that runs everything around
    nvJPEG on a machine without a GPU (tests/test_device_jpeg.py, bench/jpeg_reduction_parity.py)."""
    import cv2
    import numpy as np

    out: list[torch.Tensor | None] = []
    for data in files:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        out.append(None if array is None else torch.from_numpy(array).permute(2, 0, 1))
    return out


class DeviceJpegDecoder:
    """Decodes the passed-on JPEG files of a batch on the GPU, oriented and reduced as planned.

    ``decode(files)`` returns, per file, the HxWx3 uint8 tensor on the device, or None where the
    file must go to the CPU decoder instead (its plan is None, nvJPEG refused it, or finishing it
    ran out of memory). Errors that leave the device unusable are raised. ``batch_decode`` is
    the nvJPEG call (:func:`nvjpeg_batch_decoder`), or :func:`opencv_batch_decode` to run
    everything around it on a machine without a GPU. ``refused`` counts the
    files sent to the CPU decoder after all.
    """

    def __init__(self, batch_decode: Callable[[Sequence[bytes]], list], max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None, call_bytes: int = NVJPEG_CALL_BYTES):
        self.batch_decode = batch_decode
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.call_bytes = call_bytes
        self.refused = 0

    def decode(self, files: Sequence[bytes]) -> list[torch.Tensor | None]:
        from .gpumem import is_fatal_device_error, is_oom, release_cached

        plans = [plan_jpeg(data, max_pixels=self.max_pixels, max_side=self.max_side) for data in files]
        wanted = [k for k, plan in enumerate(plans) if plan is not None]
        out: list[torch.Tensor | None] = [None] * len(files)
        for group in self._calls(wanted, plans):
            decoded = self.batch_decode([files[k] for k in group])
            for j, k in enumerate(group):
                image, decoded[j] = decoded[j], None  # the full-size image is freed once finished
                plan = plans[k]
                if image is None or tuple(image.shape) != (3, plan.stored_height, plan.stored_width):
                    continue  # refused, or not the size the header promised: the CPU decoder decides
                try:
                    out[k] = finish(image, plan)
                except Exception as exc:
                    if is_fatal_device_error(exc):
                        raise
                    if is_oom(exc):
                        release_cached(image.device)
                    log.warning("nvJPEG result of file %d of the batch could not be finished (%s: %s); "
                                "the CPU decoder takes it", k, type(exc).__name__, str(exc).splitlines()[0][:200])
                del image
        refused = sum(1 for k in wanted if out[k] is None)
        if refused:
            self.refused += refused
            log.warning("nvJPEG refused %d of the %d JPEG files of a batch; the CPU decoder takes them", refused,
                        len(wanted))
        return out

    def _calls(self, wanted: list[int], plans: list) -> list[list[int]]:
        """Consecutive groups of files whose full-size pixels fit `call_bytes` (one file at least)."""
        groups, current, used = [], [], 0
        for k in wanted:
            need = plans[k].stored_width * plans[k].stored_height * 3
            if current and used + need > self.call_bytes:
                groups.append(current)
                current, used = [], 0
            current.append(k)
            used += need
        if current:
            groups.append(current)
        return groups
