"""Batched 5-point face alignment: every face of a batch warped to a 150x150 chip in one pass.

For each face a least-squares similarity transform (rotation + uniform scale + translation,
no reflection; the closed form of Umeyama's method, written with complex numbers and vectorised
over faces) maps its 5 landmarks onto a fixed chip template. Its inverse gives, for every chip
pixel, the source position to sample.

Sampling is bilinear, with dlib's conventions because the embedding network was trained on
dlib's chips: pixel centres sit at integer coordinates, a sample whose 2x2 neighbourhood leaves
the image is black, and the interpolated value is truncated (not rounded) to uint8.

One warp for all faces, whatever the image sizes: the (used) images are flattened into a
single uint8 pixel buffer, each with its base offset, width and height, and the four bilinear
neighbours of every chip pixel of every face are gathered from that buffer with one index
operation each. Compared with padding the images into one (B, 3, Hmax, Wmax) tensor for
``F.grid_sample`` this needs no float copy of whole photos (a 64-image batch of 12 MP photos
would be ~9 GB as float32), never samples a neighbouring image, and reproduces dlib's
out-of-bounds rule exactly. The only loop is over *images* (moving each to the device and, for
big faces, building its pyramid), never over faces.

Antialiasing: a face much larger than the chip, sampled bilinearly, aliases (each chip pixel
reads a 2x2 neighbourhood of a source that moves >2 px per chip pixel). dlib downsamples the
photo with its pyramid_down<2> first and samples the level where the face is between 1x and 2x
the chip size; this module does the same, with dlib's filter, rounding and coordinate mapping,
so chips of big faces match dlib's too (on skimage's astronaut upscaled 4x: identical to +-1
grey level; without the pyramid the descriptor moves by ~0.04-0.09 from dlib's). Differences
left: dlib builds the pyramid from a crop around each chip, whose parity can shift the
filter grid by a pixel (~0.5 grey levels mean, descriptor ~0.02).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


def invert_similarity(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of (N, 2, 3) similarity (or any invertible affine) matrices."""
    linear = matrices[:, :, :2]
    inverse_linear = torch.linalg.inv(linear)
    inverse_shift = -(inverse_linear @ matrices[:, :, 2:])
    return torch.cat([inverse_linear, inverse_shift], dim=2)


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
    """dlib's pyramid_down<2> for RGB: (1, 3, H, W) float of integers -> (1, 3, (H-3)//2, (W-3)//2).

    A separable [1 4 6 4 1] filter without padding, every other row and column, and dlib's
    integer division of the 256-weighted sum (truncation), so output pixel k is centred on
    input pixel 2k + 2.
    """
    kernel_1d = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=image.device, dtype=image.dtype)
    rows = F.conv2d(image, kernel_1d.view(1, 1, 5, 1).expand(3, 1, 5, 1), stride=(2, 1), groups=3)
    both = F.conv2d(rows, kernel_1d.view(1, 1, 1, 5).expand(3, 1, 1, 5), stride=(1, 2), groups=3)
    out = torch.floor(both / 256)
    return out[:, :, : (image.shape[2] - 3) // 2, : (image.shape[3] - 3) // 2]


# dlib maps a point one pyramid level down with p/2 - (1.25, 0.75) (pyramid_down<2>::point_down;
# not exactly the filter's centring, but chips are cut with it, so it is kept).
_POINT_DOWN_OFFSET = (1.25, 0.75)
_MIN_PYRAMID_INPUT = 9  # dlib's pyramid_down returns an empty image at 8 pixels or fewer


def _pyramid_levels_needed(chip_to_source: torch.Tensor) -> torch.Tensor:
    """dlib's rule: go down while the face, halved once more, would still exceed the chip.

    step = source pixels per chip pixel; level L samples with step / 2**L in (1, 2].
    """
    step = torch.sqrt(torch.abs(torch.linalg.det(chip_to_source[:, :, :2])))
    levels = torch.ceil(torch.log2(step.clamp_min(1.0))) - 1
    return levels.clamp_min(0).to(torch.int64)


def _as_rgb_uint8(image, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"images[{index}] must be an HxWx3 uint8 RGB array, got dtype {array.dtype} "
            f"shape {array.shape}"
        )
    return np.ascontiguousarray(array)


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

    chip_to_source = chip_to_source.to(device=device, dtype=torch.float64)
    levels = _pyramid_levels_needed(chip_to_source) if antialias else torch.zeros(num_faces, dtype=torch.int64, device=device)

    # Only the images that hold faces go into the buffer; `slot` renumbers them 0..U-1.
    used_images, slot = np.unique(image_index, return_inverse=True)
    levels_cpu = levels.cpu().numpy()
    max_level_per_slot = np.zeros(len(used_images), dtype=np.int64)
    np.maximum.at(max_level_per_slot, slot, levels_cpu)
    num_levels = int(max_level_per_slot.max()) + 1

    # Per (slot, level): base offset into the flat pixel buffer, width, height.
    base = np.zeros((len(used_images), num_levels), dtype=np.int64)
    widths = np.ones((len(used_images), num_levels), dtype=np.int64)
    heights = np.ones((len(used_images), num_levels), dtype=np.int64)
    pieces: list[torch.Tensor] = []
    offset = 0
    for s, image_id in enumerate(used_images):  # loop over images, not faces
        pixels = torch.from_numpy(_as_rgb_uint8(images[image_id], int(image_id))).to(device)
        level_image = pixels
        level_float = None
        for level in range(int(max_level_per_slot[s]) + 1):
            if level > 0:
                if level_float is None:
                    level_float = pixels.permute(2, 0, 1)[None].float()
                if min(level_float.shape[2:]) < _MIN_PYRAMID_INPUT:
                    max_level_per_slot[s] = level - 1  # image too small to go further down
                    break
                level_float = _pyramid_down(level_float)
                level_image = level_float[0].permute(1, 2, 0).to(torch.uint8)
            h, w = level_image.shape[:2]
            base[s, level], heights[s, level], widths[s, level] = offset, h, w
            pieces.append(level_image.reshape(-1, 3))
            offset += h * w
    buffer = torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    slot_t = torch.from_numpy(slot).to(device)
    levels = torch.minimum(levels, torch.from_numpy(max_level_per_slot).to(device)[slot_t])
    face_base = torch.from_numpy(base).to(device)[slot_t, levels]
    face_w = torch.from_numpy(widths).to(device)[slot_t, levels]
    face_h = torch.from_numpy(heights).to(device)[slot_t, levels]

    # Source coordinates of every chip pixel, then into the chosen pyramid level.
    coords = torch.arange(size, device=device, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    m = chip_to_source
    scale = torch.pow(2.0, -levels.double()).view(-1, 1, 1)
    # point_down applied L times: p / 2**L - offset * 2 * (1 - 2**-L)
    shift = 2 * (1 - scale)
    src_x = (m[:, 0, 0, None, None] * grid_x + m[:, 0, 1, None, None] * grid_y + m[:, 0, 2, None, None]) * scale
    src_y = (m[:, 1, 0, None, None] * grid_x + m[:, 1, 1, None, None] * grid_y + m[:, 1, 2, None, None]) * scale
    src_x = src_x - _POINT_DOWN_OFFSET[0] * shift
    src_y = src_y - _POINT_DOWN_OFFSET[1] * shift

    x0 = torch.floor(src_x)
    y0 = torch.floor(src_y)
    fx = (src_x - x0).float()[..., None]
    fy = (src_y - y0).float()[..., None]
    x0 = x0.to(torch.int64)
    y0 = y0.to(torch.int64)
    w = face_w.view(-1, 1, 1)
    h = face_h.view(-1, 1, 1)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    # Clamp so every gather is in range; samples outside are blanked by `inside` below.
    x0 = torch.minimum(x0.clamp_min(0), (w - 2).clamp_min(0))
    y0 = torch.minimum(y0.clamp_min(0), (h - 2).clamp_min(0))
    x1 = torch.minimum(x0 + 1, w - 1)
    y1 = torch.minimum(y0 + 1, h - 1)
    row0 = face_base.view(-1, 1, 1) + y0 * w
    row1 = face_base.view(-1, 1, 1) + y1 * w

    def gather(index: torch.Tensor) -> torch.Tensor:
        return buffer.index_select(0, index.reshape(-1)).view(num_faces, size, size, 3).float()

    top = gather(row0 + x0) * (1 - fx) + gather(row0 + x1) * fx
    bottom = gather(row1 + x0) * (1 - fx) + gather(row1 + x1) * fx
    value = top * (1 - fy) + bottom * fy
    # dlib assigns the interpolated float into uint8 with a cast, i.e. truncation.
    value = value.clamp_(0, 255).floor_() * inside[..., None]
    return value.to(torch.uint8)


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
    if landmarks.shape[0] == 0:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=torch.device(device))
    if not torch.isfinite(landmarks).all():
        raise ValueError("landmarks contain NaN or infinite values")
    chip_to_source = chip_to_source_transforms(landmarks, template, size)
    return warp_chips(images, image_index, chip_to_source, size=size, antialias=antialias, device=device)
