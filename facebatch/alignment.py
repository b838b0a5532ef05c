"""Batched 5-point face alignment: every face of a batch warped to a 150x150 chip in one pass.

For each face a least-squares similarity transform (rotation + uniform scale + translation,
no reflection; the closed form of Umeyama's method, written with complex numbers and vectorised
over faces) maps its 5 landmarks onto a fixed chip template. Its inverse gives, for every chip
pixel, the source position to sample.

Sampling is bilinear, with dlib's conventions because the embedding network was trained on
dlib's chips: pixel centres sit at integer coordinates, a sample whose 2x2 neighbourhood leaves
the image is black, and the interpolated value is truncated (not rounded) to uint8.

One warp for all faces, whatever the image sizes: from each image that holds faces, the region
its chips read is cropped (as dlib does), and the crops (and their pyramid levels) are
flattened into a single uint8 pixel buffer, each with its base offset, width and height. The
four bilinear neighbours of every chip pixel of every face are then gathered from that buffer
with one index operation each. Compared with padding whole images into one (B, 3, Hmax, Wmax)
float tensor for ``F.grid_sample`` this copies only the pixels around faces, never in float (a
64-image batch of 12 MP photos would be ~9 GB as float32), never samples a neighbouring image,
and reproduces dlib's out-of-bounds rule exactly. The only loop is over *images* (cropping,
moving to the device and, for big faces, building the pyramid), never over faces.

Antialiasing: a face much larger than the chip, sampled bilinearly, aliases (each chip pixel
reads a 2x2 neighbourhood of a source that moves >2 px per chip pixel). dlib downsamples the
photo with its pyramid_down<2> first and samples the level where the face is between 1x and 2x
the chip size; this module does the same, with dlib's level rule, filter, integer rounding and
coordinate mapping (skimage's astronaut upscaled 4x: chip identical to dlib's to +-1 grey
level; without the pyramid the descriptor moves ~0.04-0.09 from dlib's). One deliberate
difference: crops start on a 32-pixel grid instead of at each chip's own region, so that a
chip never depends on which other faces share its photo or batch; at pyramid levels this can
shift the filter grid by a pixel against dlib's (~0.5 grey levels mean, ~0.02 in descriptor).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .staging import Upload, upload_all
from .versions import ALIGNMENT_CODE_VERSION  # noqa: F401  (bump it there with any result-changing change here)

__all__ = [
    "CHIP_SIZE",
    "DLIB_SHAPE5_TEMPLATE",
    "MTCNN_TEMPLATE",
    "align_faces",
    "chip_to_source_transforms",
    "similarity_transforms",
    "warp_chips",
]

CHIP_SIZE = 150

# Where MTCNN's five points (left eye centre, right eye centre, nose tip, left and right mouth
# corners; "left" = image left) land, on average, in dlib's own 150 px chips
# (get_face_chip(size=150, padding=0.25) from dlib's 5-point shape predictor), in chip pixels.
# Measured on real photos: aligning MTCNN points onto these moves descriptors from dlib's by a
# median of ~0.12 Euclidean (a photo vs its mirror image: ~0.20), far below the 0.6 threshold.
# Re-measured on the shared corpus with facebatch's MTCNN (58 photos that are not tight face
# crops): per-point spread ~6 px; median eyes within ~1.5 px of these, nose ~3 px lower, mouth
# corners ~3 px higher. Using that median instead did not bring descriptors closer to dlib's (0.127 vs 0.122 median
# distance on those photos), so the independently measured values stay.
MTCNN_TEMPLATE = np.array(
    [[47.8, 46.4], [101.3, 46.5], [74.9, 75.2], [48.3, 103.7], [101.1, 103.5]], dtype=np.float64
)

# dlib's template for its own 5-point shape predictor (parts 0..4: eye corners and nose base),
# in the unit square before padding (dlib/image_transforms/interpolation.h,
# get_face_chip_details). Used by tests to reproduce dlib.get_face_chip exactly.
_DLIB_SHAPE5_UNIT = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)


def dlib_shape5_template(size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
    return (_DLIB_SHAPE5_UNIT + padding) / (2 * padding + 1) * size


DLIB_SHAPE5_TEMPLATE = dlib_shape5_template()


def similarity_transforms(source_points: torch.Tensor, target_points: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity from source to target points, vectorised over faces.

    source_points: (N, K, 2); target_points: (K, 2) or (N, K, 2). Returns (N, 2, 3) matrices A
    with target ~= A[:, :, :2] @ source + A[:, :, 2]. Points as complex numbers z = x + iy:
    the best map z -> a * (z - mean_z) + mean_w has a = sum((w - mean_w) * conj(z - mean_z)) /
    sum(|z - mean_z|^2), which is Umeyama's solution for 2-D without reflection.
    """
    src = torch.complex(source_points[..., 0].double(), source_points[..., 1].double())
    dst = target_points.to(device=source_points.device, dtype=torch.float64)
    dst = torch.complex(dst[..., 0], dst[..., 1])
    if dst.dim() == 1:
        dst = dst.expand_as(src)
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=1, keepdim=True)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    denominator = (src_c.abs() ** 2).sum(dim=1)
    a = (dst_c * src_c.conj()).sum(dim=1) / denominator.clamp_min(1e-12)
    b = dst_mean[:, 0] - a * src_mean[:, 0]
    matrices = torch.stack(
        [
            torch.stack([a.real, -a.imag, b.real], dim=1),
            torch.stack([a.imag, a.real, b.imag], dim=1),
        ],
        dim=1,
    )
    return matrices


def chip_to_source_transforms(
    landmarks: torch.Tensor, template: np.ndarray | torch.Tensor, size: int = CHIP_SIZE
) -> torch.Tensor:
    """(N, 2, 3) float64 maps from chip pixel (x, y) to source image pixel (x, y), as dlib makes them.

    dlib (get_face_chip_details -> chip_details -> extract_image_chip) fits the similarity in the
    chip -> image direction, keeps its rotation, scale s and the image of the chip centre
    (size/2, size/2), and then maps the chip's corner pixels 0 and size-1 onto the corners of a
    rectangle around that centre whose corners are size*s - 1 apart (dlib's centered_rect).
    Net effect: scale (size*s - 1)/(size - 1) about chip pixel (size-1)/2, i.e. a half-pixel
    shift compared with the plain fit. The network was trained on such chips, so they are
    reproduced exactly.
    """
    template = torch.as_tensor(np.asarray(template, dtype=np.float64), device=landmarks.device)
    template = template.expand(landmarks.shape[0], -1, -1)
    fit = similarity_transforms(template, landmarks.double())
    a = torch.complex(fit[:, 0, 0], fit[:, 1, 0])
    b = torch.complex(fit[:, 0, 2], fit[:, 1, 2])
    centre = a * complex(size / 2, size / 2) + b
    a = a * ((size * a.abs() - 1) / (size - 1) / a.abs().clamp_min(1e-12))
    b = centre - a * complex((size - 1) / 2, (size - 1) / 2)
    return torch.stack(
        [
            torch.stack([a.real, -a.imag, b.real], dim=1),
            torch.stack([a.imag, a.real, b.imag], dim=1),
        ],
        dim=1,
    )


def _pyramid_down(image: torch.Tensor) -> torch.Tensor:
    """dlib's pyramid_down<2> for RGB: (H, W, 3) uint8 -> ((H-3)//2, (W-3)//2, 3) uint8.

    A separable [1 4 6 4 1] filter without padding, keeping every other row and column, and
    dlib's integer division of the 256-weighted sum (truncation): output pixel k is centred on
    input pixel 2k + 2. Integer arithmetic on strided views: exact, and ~40x faster on CPU than
    a depthwise conv2d.
    """
    rows_out, cols_out = (image.shape[0] - 3) // 2, (image.shape[1] - 3) // 2

    def taps(t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
        def tap(k: int) -> torch.Tensor:  # elements k, k + 2, ..., k + 2 * (count - 1)
            return t.narrow(dim, k, 2 * count - 1)[(slice(None),) * dim + (slice(None, None, 2),)]

        return tap(0) + tap(4) + 4 * (tap(1) + tap(3)) + 6 * tap(2)

    # Rows first in int16 (sums <= 255 * 16), then columns in int32 (<= 255 * 256).
    vertical = taps(image.to(torch.int16), 0, rows_out)
    both = taps(vertical.to(torch.int32), 1, cols_out)
    return (both >> 8).to(torch.uint8)


# dlib maps a point one pyramid level down with p/2 - (1.25, 0.75) (pyramid_down<2>::point_down;
# not exactly the filter's centring, but chips are cut with it, so it is kept).
_POINT_DOWN_OFFSET = (1.25, 0.75)
_CROP_GRID = 32  # crops start on multiples of 32 px: same pyramid phase up to level 5
_MIN_PYRAMID_INPUT = 9  # dlib's pyramid_down returns an empty image at 8 pixels or fewer


def _dlib_levels_and_crops(
    chip_to_source: np.ndarray, size: int, antialias: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per face: dlib's pyramid level and the image region it reads (extract_image_chips).

    chip_to_source: (N, 2, 3) float64. The chip's square in the image has side
    (size * s - 1) (scale (size*s - 1)/(size - 1) per chip pixel, see
    chip_to_source_transforms). dlib goes one level further down while that square, halved
    once more, would still be bigger than the chip (its side + 1 > size); it reads the square's rotated bounding
    box grown by 2, 6, 14, ... pixels (2**(L+2) - 2 for level L), rounded to whole pixels.
    Returns levels (N,) int64 and regions (N, 4) float64 [left, top, right, bottom] inclusive.
    """
    linear = chip_to_source[:, :, :2]
    per_chip_pixel = np.sqrt(np.abs(np.linalg.det(linear)))
    side = per_chip_pixel * (size - 1)  # size * s - 1
    if antialias:
        # dlib's drectangle area counts (r - l + 1)^2: down k levels while side / 2**k + 1 > size.
        ratio = np.maximum(side / (size - 1), 1e-300)
        levels = np.maximum(np.ceil(np.log2(ratio)) - 1, 0).astype(np.int64)
    else:
        levels = np.zeros(len(side), dtype=np.int64)
    centre = linear @ np.full(2, (size - 1) / 2) + chip_to_source[:, :, 2]
    cos_sin = np.abs(linear[:, :, 0]) / np.maximum(per_chip_pixel, 1e-300)[:, None]
    half = side / 2 * (cos_sin[:, 0] + cos_sin[:, 1])  # half extent of the rotated square
    grow = 2.0 ** (levels + 2) - 2
    reach = (half + grow)[:, None]
    regions = np.concatenate([centre - reach, centre + reach], axis=1)
    return levels, regions


def _as_rgb_uint8(image, index: int):
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image  # e.g. a batch the analyzer uploaded once for detection and alignment
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"images[{index}] must be an HxWx3 uint8 RGB array, got dtype {array.dtype} "
            f"shape {array.shape}"
        )
    return array  # any strides: only the crop around the faces is copied, later


def warp_chips(
    images: Sequence[np.ndarray],
    image_index,
    chip_to_source: torch.Tensor,
    size: int = CHIP_SIZE,
    antialias: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Sample (N, size, size, 3) uint8 chips; chip_to_source: (N, 2, 3) chip px -> image px."""
    device = torch.device(device)
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    num_faces = image_index.shape[0]
    if chip_to_source.shape != (num_faces, 2, 3):
        raise ValueError(f"chip_to_source must be ({num_faces}, 2, 3), got {tuple(chip_to_source.shape)}")
    if num_faces == 0:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device)
    if image_index.min() < 0 or image_index.max() >= len(images):
        raise ValueError(f"image_index out of range for {len(images)} images")

    chip_to_source_cpu = chip_to_source.detach().to("cpu", torch.float64).numpy().copy()
    levels, regions = _dlib_levels_and_crops(chip_to_source_cpu, size, antialias)

    # Like dlib, each image contributes only the region its chips read (the union over its
    # faces, clipped to the image, rounded to whole pixels); its pyramid is built from that
    # crop. Only images with faces take part; `slot` renumbers them 0..U-1.
    used_images, slot = np.unique(image_index, return_inverse=True)
    arrays = [_as_rgb_uint8(images[i], int(i)) for i in used_images]
    image_h = np.array([a.shape[0] for a in arrays])[slot]
    image_w = np.array([a.shape[1] for a in arrays])[slot]
    clipped = np.stack(
        [
            np.maximum(regions[:, 0], 0),
            np.maximum(regions[:, 1], 0),
            np.minimum(regions[:, 2], image_w - 1),
            np.minimum(regions[:, 3], image_h - 1),
        ],
        axis=1,
    )
    clipped = np.floor(clipped + 0.5).astype(np.int64)  # dlib's drectangle -> rectangle
    nonempty = (clipped[:, 0] <= clipped[:, 2]) & (clipped[:, 1] <= clipped[:, 3])
    big = np.iinfo(np.int64).max
    crop = np.tile(np.array([big, big, -1, -1], dtype=np.int64), (len(used_images), 1))
    np.minimum.at(crop[:, 0], slot[nonempty], clipped[nonempty, 0])
    np.minimum.at(crop[:, 1], slot[nonempty], clipped[nonempty, 1])
    np.maximum.at(crop[:, 2], slot[nonempty], clipped[nonempty, 2])
    np.maximum.at(crop[:, 3], slot[nonempty], clipped[nonempty, 3])
    crop[crop[:, 0] == big, :2] = 0  # every chip of this image lies outside it: empty crop
    # Snap crops outwards to a fixed grid (clipped to the image), so the pyramid's sampling
    # phase (and so each chip) does not depend on which other faces share the image or the
    # batch. dlib crops each chip's region exactly; at pyramid levels that can shift its
    # filter grid by a pixel relative to ours (~0.5 grey levels mean, ~0.02 in descriptor).
    heights_all = np.array([a.shape[0] for a in arrays])
    widths_all = np.array([a.shape[1] for a in arrays])
    crop[:, 0] = crop[:, 0] // _CROP_GRID * _CROP_GRID
    crop[:, 1] = crop[:, 1] // _CROP_GRID * _CROP_GRID
    crop[:, 2] = np.minimum((crop[:, 2] // _CROP_GRID + 1) * _CROP_GRID - 1, widths_all - 1)
    crop[:, 3] = np.minimum((crop[:, 3] // _CROP_GRID + 1) * _CROP_GRID - 1, heights_all - 1)

    max_level_per_slot = np.zeros(len(used_images), dtype=np.int64)
    np.maximum.at(max_level_per_slot, slot, levels)
    num_levels = int(max_level_per_slot.max()) + 1

    # Per (slot, level): base offset into the flat pixel buffer, width, height.
    base = np.zeros((len(used_images), num_levels), dtype=np.int64)
    widths = np.zeros((len(used_images), num_levels), dtype=np.int64)
    heights = np.zeros((len(used_images), num_levels), dtype=np.int64)
    pieces: list[torch.Tensor] = [torch.zeros((1, 3), dtype=torch.uint8, device=device)]
    offset = 1  # pixel 0 is a black pixel that empty crops point at
    # The regions of host images go to the device in one transfer (a pageable copy per image
    # would wait for the GPU's queue each time); regions of images already there are views.
    upload = Upload(device)
    regions_by_slot: dict[int, object] = {}
    for s, array in enumerate(arrays):
        left, top, right, bottom = crop[s]
        if right < left or bottom < top:
            max_level_per_slot[s] = 0
            continue
        region = array[top : bottom + 1, left : right + 1]
        regions_by_slot[s] = region.to(device) if isinstance(region, torch.Tensor) else upload.add(region)
    sent = upload.send()
    with warnings.catch_warnings():
        # Decoded images are often read-only numpy arrays; they are only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for s, region in regions_by_slot.items():  # loop over images, not faces
            level_image = sent[region] if isinstance(region, int) else region.contiguous()
            for level in range(int(max_level_per_slot[s]) + 1):
                if level > 0:
                    if min(level_image.shape[:2]) < _MIN_PYRAMID_INPUT:
                        max_level_per_slot[s] = level - 1  # crop too small to go further down
                        break
                    level_image = _pyramid_down(level_image)
                h, w = level_image.shape[:2]
                base[s, level], heights[s, level], widths[s, level] = offset, h, w
                pieces.append(level_image.reshape(-1, 3))
                offset += h * w
    buffer = torch.cat(pieces)

    levels = np.minimum(levels, max_level_per_slot[slot])
    # Sample in crop coordinates.
    chip_to_source_cpu[:, 0, 2] -= crop[slot, 0]
    chip_to_source_cpu[:, 1, 2] -= crop[slot, 1]
    face_base, face_w, face_h, chip_to_source, levels = upload_all(
        [base[slot, levels], widths[slot, levels], heights[slot, levels], chip_to_source_cpu, levels], device)

    # Chip pixel -> coordinates in the chosen pyramid level: point_down applied L times is
    # p / 2**L - offset * 2 * (1 - 2**-L).
    scale = torch.pow(2.0, -levels.double()).view(-1, 1)
    shift = 2 * (1 - scale)
    linear = chip_to_source[:, :, :2] * scale[:, :, None]
    offset_x = chip_to_source[:, 0, 2:] * scale - _POINT_DOWN_OFFSET[0] * shift
    offset_y = chip_to_source[:, 1, 2:] * scale - _POINT_DOWN_OFFSET[1] * shift
    # Affine in (column j, row i): a sum of a per-column and a per-row term, so the full
    # (N, size, size) grids cost one broadcast add each.
    steps = torch.arange(size, device=device, dtype=torch.float64)
    src_x = (linear[:, 0, 0, None] * steps + offset_x)[:, None, :] + (linear[:, 0, 1, None] * steps)[:, :, None]
    src_y = (linear[:, 1, 0, None] * steps + offset_y)[:, None, :] + (linear[:, 1, 1, None] * steps)[:, :, None]

    x0 = torch.floor(src_x)
    y0 = torch.floor(src_y)
    fx = (src_x - x0).float().unsqueeze(-1)
    fy = (src_y - y0).float().unsqueeze(-1)
    # int32 indices halve the memory traffic; crops of a batch stay far below 2**31 pixels.
    index_dtype = torch.int32 if buffer.shape[0] < 2**31 - 1 else torch.int64
    x0 = x0.to(index_dtype)
    y0 = y0.to(index_dtype)
    w = face_w.to(index_dtype).view(-1, 1, 1)
    h = face_h.to(index_dtype).view(-1, 1, 1)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    # Clamp so every gather is in range; samples outside are blanked by `inside` below.
    x0 = torch.minimum(x0.clamp_min(0), (w - 2).clamp_min(0))
    y0 = torch.minimum(y0.clamp_min(0), (h - 2).clamp_min(0))
    index00 = face_base.to(index_dtype).view(-1, 1, 1) + y0 * w + x0
    step_x = (w > 1).to(index_dtype)  # x0 + 1 stays inside images one pixel wide (all blanked anyway)
    step_y = (h > 1).to(index_dtype) * w

    def gather(index: torch.Tensor) -> torch.Tensor:
        return buffer.index_select(0, index.reshape(-1)).view(num_faces, size, size, 3).float()

    top = gather(index00).lerp_(gather(index00 + step_x), fx)
    index10 = index00 + step_y
    bottom = gather(index10).lerp_(gather(index10 + step_x), fx)
    value = top.lerp_(bottom, fy)
    # dlib assigns the interpolated float into uint8 with a cast, i.e. truncation.
    value = value.clamp_(0, 255).mul_(inside.unsqueeze(-1))
    return value.to(torch.uint8)  # float -> uint8 conversion truncates


def align_faces(
    images: Sequence[np.ndarray],
    image_index,
    landmarks,
    template: np.ndarray = MTCNN_TEMPLATE,
    size: int = CHIP_SIZE,
    antialias: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Aligned (N, size, size, 3) uint8 RGB chips on `device` from (N, 5, 2) landmarks.

    landmarks: image pixels (x, y), in the template's order (for MTCNN_TEMPLATE: left eye,
    right eye, nose, left mouth corner, right mouth corner). template: chip pixels for `size`.
    """
    landmarks = torch.as_tensor(np.asarray(landmarks, dtype=np.float64))
    if landmarks.dim() != 3 or landmarks.shape[2] != 2 or landmarks.shape[1] != len(template):
        raise ValueError(f"landmarks must be (N, {len(template)}, 2), got {tuple(landmarks.shape)}")
    if np.asarray(image_index).reshape(-1).shape[0] != landmarks.shape[0]:
        raise ValueError(
            f"image_index has {np.asarray(image_index).size} entries for {landmarks.shape[0]} faces' landmarks"
        )
    if landmarks.shape[0] == 0:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=torch.device(device))
    if not torch.isfinite(landmarks).all():
        raise ValueError("landmarks contain NaN or infinite values")
    chip_to_source = chip_to_source_transforms(landmarks, template, size)
    return warp_chips(images, image_index, chip_to_source, size=size, antialias=antialias, device=device)
