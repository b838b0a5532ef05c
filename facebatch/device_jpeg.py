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


def reduce(image: torch.Tensor, factor: int) -> torch.Tensor:
    """HxWx3 uint8 averaged over factor x factor blocks to ceil(H/f) x ceil(W/f), the array size
    libjpeg's DCT scaling gives (edge blocks average the pixels they have)."""
    if factor == 1:
        return image
    chw = image.permute(2, 0, 1)[None].float()
    pooled = F.avg_pool2d(chw, factor, stride=factor, ceil_mode=True, count_include_pad=False)
    return pooled[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def finish(image_chw: torch.Tensor, plan: JpegPlan) -> torch.Tensor:
    """A decoded 3xHxW image -> the C-contiguous HxWx3 array the CPU decoder would give."""
    return orient(reduce(image_chw.permute(1, 2, 0), plan.factor), plan.orientation).contiguous()


class NvJpegUnavailable(RuntimeError):
    """--gpu-jpeg-decode was asked for where nvJPEG cannot run (no CUDA, or no torchvision)."""


def nvjpeg_batch_decoder(device: torch.device | str) -> Callable[[Sequence[bytes]], list[torch.Tensor | None]]:
    """A function that decodes a batch of JPEG files with nvJPEG on ``device`` (3xHxW uint8
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

    def decode(files: Sequence[bytes]) -> list[torch.Tensor | None]:
        if not files:
            return []
        inputs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one bad file fails the whole batched call: find it, decode the others
        out: list[torch.Tensor | None] = []
        for one in inputs:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                from .gpumem import is_fatal_device_error

                if is_fatal_device_error(exc):
                    raise
                out.append(None)
        return out

    return decode


class DeviceJpegDecoder:
    """Decodes the passed-on JPEG files of a batch on the GPU, oriented and reduced as planned.

    ``decode(files)`` returns, per file, the HxWx3 uint8 tensor on the device, or None where the
    file must go to the CPU decoder instead (its plan is None, or nvJPEG refused it).
    ``batch_decode`` is the nvJPEG call (:func:`nvjpeg_batch_decoder`); the tests give the same
    interface a CPU decoder, to run everything around it on a machine without a GPU.
    """

    def __init__(self, batch_decode: Callable[[Sequence[bytes]], list], max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None):
        self.batch_decode = batch_decode
        self.max_pixels = max_pixels
        self.max_side = max_side

    def decode(self, files: Sequence[bytes]) -> list[torch.Tensor | None]:
        plans = [plan_jpeg(data, max_pixels=self.max_pixels, max_side=self.max_side) for data in files]
        wanted = [k for k, plan in enumerate(plans) if plan is not None]
        decoded = self.batch_decode([files[k] for k in wanted])
        out: list[torch.Tensor | None] = [None] * len(files)
        for k, image in zip(wanted, decoded):
            plan = plans[k]
            if image is None or tuple(image.shape) != (3, plan.stored_height, plan.stored_width):
                continue  # refused, or not the size the header promised: the CPU decoder decides
            out[k] = finish(image, plan)
        return out
