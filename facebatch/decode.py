"""Image bytes -> RGB uint8 array, with EXIF orientation, size limits and reduced-size decoding.

Every failure is a :class:`DecodeError` carrying one of five statuses and a message meant for a
person scanning an error table; the caller turns it into the image's ``images`` row. Anything a
decoder library raises on bad data is mapped to one of those statuses, so a bad photo never stops
a run.

Policies (the contract other modules rely on)
---------------------------------------------
* Format is recognised from the bytes (:func:`sniff_format`), never from a file name.
* Decompression-bomb guard: the pixel count is read from the header (Pillow's ``open`` is lazy) and
  checked against ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS` = 100 MP) before any pixel is
  decoded. Pillow's own process-wide ``Image.MAX_IMAGE_PIXELS`` check is bypassed by opening through
  the format plugin directly, so *our* limit decides and no global setting is touched. (Pillow still
  checks its limit inside a few decoders, e.g. TIFF and GIF frames; if a caller raises ``max_pixels``
  above Pillow's limit, such a file may emit Pillow's warning or fail as ``too_large``.)
* Truncated data is an error (status ``truncated``), never a partially grey image. Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched; if other code in the process sets it, Pillow
  decodes truncated files partially and we cannot tell. A file whose pixel data is complete but that
  ends inside a later chunk (e.g. a PNG cut inside a trailing redundant IDAT chunk) is also reported
  as ``truncated``: the object is damaged (often an incomplete upload), and re-fetching it is the fix.
* EXIF orientation (JPEG, WebP, PNG eXIf, TIFF, ...) is applied; ``width``/``height`` are the
  oriented full-size dimensions. An unreadable EXIF block falls back to orientation 1.
* Colour: CMYK (including Adobe inverted CMYK) is converted through its embedded ICC profile to sRGB
  when it has one (naive conversion of print CMYK is visibly oversaturated; CMYK photos are rare so
  the ~30 ms transform build is affordable), otherwise with Pillow's naive formula. ICC profiles of
  RGB/grey images are ignored: converting e.g. Display P3 to sRGB costs more than the decode itself
  and does not matter to face detection. CIELab is converted to sRGB. Alpha (LA, RGBA, PA, palette
  or grey/RGB with a transparent colour key) is composited on white, the way viewers show it, so
  transparent pixels' arbitrary colour values never leak into detection. 16-bit samples are scaled
  to 8 bits (``v * 255 / 65535`` rounded for 16-bit grey; the high byte for 16-bit RGB in Pillow),
  never clipped.
* ``max_side`` (optional) lets the caller ask for a smaller array: JPEG uses DCT scaling (1/2, 1/4,
  1/8) chosen so that the array's longer side stays >= ``max_side`` (so it is between ``max_side``
  and about twice that); other formats are decoded at full size and, when their longer side exceeds
  ``max_side``, resized to exactly ``max_side`` with ``cv2.INTER_AREA``. ``scale`` is
  ``width / rgb.shape[1]``: multiply array coordinates by it to get pixels of the oriented full-size
  image. With DCT scaling the array side is ``ceil(side / factor)``, so the vertical ratio can differ
  from ``scale`` by less than one full-size pixel per side.
* Speed: baseline/progressive RGB and grey JPEGs whose data ends with the EOI marker are decoded by
  ``cv2.imdecode`` (about 20 % faster than Pillow here, pixel-identical on the 166-JPEG corpus; the
  header, EXIF and size limit still come from Pillow's lazy open). Everything else, and any JPEG
  OpenCV refuses, goes through Pillow, which also classifies the errors. ``rgb`` is read-only
  (Pillow's buffer is exported without a copy); callers that want to modify it copy it.
* Thread and process safety: no global state of Pillow, OpenCV or ``warnings`` is modified. Pillow
  may print its own warnings (e.g. "Corrupt EXIF data") and libjpeg inside OpenCV may print
  "Corrupt JPEG data" lines to stderr; both are harmless.
* Optional plugins: HEIF/HEIC needs ``pillow-heif`` (used directly, without registering it in
  Pillow globally); without it HEIF is ``unsupported_format``. AVIF is native in Pillow >= 11.3.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageFile, JpegImagePlugin

from .versions import DECODER_CODE_VERSION  # noqa: F401  (bump it there with any result-changing change here)

DEFAULT_MAX_PIXELS = 100_000_000

DecodeStatus = Literal["not_image", "unsupported_format", "corrupt", "truncated", "too_large"]
DECODE_STATUSES: tuple[str, ...] = ("not_image", "unsupported_format", "corrupt", "truncated", "too_large")


class DecodeError(Exception):
    """Decoding failed; ``status`` is one of :data:`DECODE_STATUSES`, ``message`` is for people."""

    def __init__(self, status: DecodeStatus, message: str):
        if status not in DECODE_STATUSES:
            raise ValueError(f"unknown decode status {status!r}")
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedImage:
    rgb: np.ndarray  # (H', W', 3) uint8, C-contiguous, read-only, oriented
    width: int  # full-size width after EXIF orientation
    height: int  # full-size height after EXIF orientation
    scale: float  # width / rgb.shape[1]; >= 1.0
    format: str  # e.g. "JPEG", "PNG", "HEIF"
    orientation: int  # EXIF orientation 1-8 found in the file (1 when absent or unreadable)


# ---------------------------------------------------------------------------------------------
# Format sniffing
# ---------------------------------------------------------------------------------------------

_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
                b"msf1", b"mif2"}


def _iso_bmff_brands(data: bytes) -> list[bytes]:
    """Major and compatible brands of an ISO base media file ('ftyp' box first), else []."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return []
    box_size = struct.unpack(">I", data[:4])[0]
    if box_size < 16:
        return []
    end = min(box_size, len(data))
    brands = [data[8:12]]
    brands += [data[i:i + 4] for i in range(16, end - 3, 4)]
    return brands


def sniff_format(data: bytes) -> str | None:
    """Image format from magic bytes (Pillow's format names), or None when not a known image."""
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is too weak a magic; require a known DIB header size as well.
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in (12, 16, 40, 52, 56, 64, 108, 124):
        return "BMP"
    brands = _iso_bmff_brands(bytes(data[:256]))
    if brands:
        if _AVIF_BRANDS.intersection(brands):
            return "AVIF"
        if _HEIF_BRANDS.intersection(brands):
            return "HEIF"
        if b"jxl " in brands:
            return "JXL"
        return None  # MP4/MOV video, CR3 raw, ...: not a still image we decode
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n") or head.startswith(b"\xff\x0a"):
        return "JXL"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] == b"qoif":
        return "QOI"
    if head[:4] == b"DDS ":
        return "DDS"
    if head[:4] == b"\x00\x00\x01\x00" and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ICO"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PPM"
    return None


def _describe_non_image(data: bytes) -> str:
    head = bytes(data[:512])
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html")) or b"<html" in stripped[:256]:
        return "looks like HTML"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<svg"):
        return "looks like XML/SVG text"
    if head.startswith(b"PK\x03\x04"):
        return "looks like a ZIP archive"
    if head.startswith(b"%PDF"):
        return "looks like a PDF document"
    if head.startswith(b"\x1f\x8b"):
        return "looks like gzip data"
    # Only the kind of file is described, never its content: this message lands in the images
    # table, and the file may be anything a manifest or a bucket points at.
    brands = _iso_bmff_brands(head)
    if brands:
        brand = brands[0].decode("latin-1")
        named = f" with brand {brand!r}" if brand.replace(" ", "").isalnum() else ""
        return f"ISO media file{named}, not a still image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text[:200]):
        return "looks like text"
    return "unrecognised binary data"


# ---------------------------------------------------------------------------------------------
# Opening (header only) without Pillow's global decompression-bomb check
# ---------------------------------------------------------------------------------------------

def _pillow_factory(fmt: str):
    if fmt == "JPEG":
        # The plain JPEG class, not Pillow's jpeg_factory: an MPO / Ultra HDR file would become an
        # MpoImageFile, whose frame seek applies Pillow's global limit; we want the primary image.
        return JpegImagePlugin.JpegImageFile
    if fmt == "HEIF":
        try:
            from pillow_heif import HeifImageFile  # optional plugin, used without registration
        except ImportError:
            return None
        return HeifImageFile
    if fmt not in Image.OPEN:
        Image.init()  # Pillow's own lazy plugin import, as Image.open does; idempotent
    entry = Image.OPEN.get(fmt)
    return entry[0] if entry else None


def _is_truncation(exc: BaseException) -> bool:
    if isinstance(exc, EOFError):
        return True
    text = str(exc).lower()
    return "truncated" in text or "premature end" in text


def _open_header(data: bytes, fmt: str) -> Image.Image:
    factory = _pillow_factory(fmt)
    if factory is None:
        if fmt == "HEIF":
            raise DecodeError("unsupported_format",
                              "HEIF/HEIC image: no decoder available (install the optional 'pillow-heif' package)")
        raise DecodeError("unsupported_format", f"{fmt} image: no decoder for this format is available")
    try:
        return factory(io.BytesIO(data), "")
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"{fmt} header rejected by Pillow's size limit: {exc}") from exc
    except MemoryError as exc:
        raise DecodeError("too_large", f"{fmt} header asks for more memory than is available") from exc
    except Exception as exc:  # plugins raise SyntaxError/OSError/struct.error/... on bad headers
        if _container_cut_short(data, fmt):  # decoders that read everything at open (WebP, AVIF)
            raise DecodeError("truncated", f"{fmt} data ends early (truncated after {len(data)} bytes)") from exc
        if _is_truncation(exc) or isinstance(exc, struct.error):
            raise DecodeError("truncated",
                              f"{fmt} data ends early, inside the header (file is {len(data)} bytes)") from exc
        raise DecodeError("corrupt", f"{fmt} header is damaged: {_exc_text(exc)}") from exc


def _container_cut_short(data: bytes, fmt: str) -> bool:
    """Whether a size-declaring container (RIFF for WebP, ISO BMFF boxes for AVIF/HEIF) ends early.

    libwebp and libheif report a cut file only as a generic failure, so the container's own length
    fields are the evidence that tells "truncated" from "corrupt".
    """
    if fmt == "WEBP" and len(data) >= 8:
        return struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    if fmt in ("AVIF", "HEIF", "JXL"):
        offset = 0
        while offset + 8 <= len(data):
            size = struct.unpack(">I", data[offset:offset + 4])[0]
            if size == 1:
                if offset + 16 > len(data):
                    return True
                size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
            elif size == 0:  # box extends to the end of the file
                return False
            if size < 8:
                return False  # not a box structure we can reason about
            offset += size
        return offset > len(data)
    return False


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip()
    # Some decoder messages quote the file's own bytes (Pillow's PPM plugin does): the images table
    # gets only the exception's type then, never content of the file.
    if any(isinstance(arg, (bytes, bytearray)) for arg in exc.args) or "b'" in text or 'b"' in text:
        text = ""
    text = text[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------

_ORIENTATION_TAG = 0x0112


def _read_orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8; 1 when absent, garbled or unreadable (a bad EXIF never fails a decode)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF blocks raise all kinds of errors inside Pillow
        return 1
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into display pixels (same semantics as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return cv2.flip(arr, 1)  # mirror left-right
    if orientation == 3:
        return cv2.rotate(arr, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(arr, 0)  # mirror top-bottom
    if orientation == 5:
        return cv2.transpose(arr)  # mirror along the main diagonal
    if orientation == 6:
        return cv2.rotate(arr, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(arr), -1)  # mirror along the anti-diagonal
    if orientation == 8:
        return cv2.rotate(arr, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return arr


# ---------------------------------------------------------------------------------------------
# Pixel conversion to RGB uint8
# ---------------------------------------------------------------------------------------------

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_WHITE = (255, 255, 255)


def _grey16_to_8(arr: np.ndarray) -> np.ndarray:
    wide = np.clip(arr, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2RGB)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                                ImageCms.createProfile("sRGB"), "CMYK", "RGB")
            return ImageCms.applyTransform(im, transform)
        except Exception:  # a broken or non-CMYK profile: fall back to the naive formula
            pass
    return im.convert("RGB")


def _pillow_to_rgb(im: Image.Image) -> np.ndarray:
    """Loaded Pillow image (any mode) -> (H, W, 3) uint8 array, avoiding copies for RGB and L."""
    mode = im.mode
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        composed = Image.new("RGB", im.size, _WHITE)
        composed.paste(rgba, mask=rgba)  # uses the alpha band as mask: alpha compositing on white
        return np.asarray(composed)
    if mode == "RGB":
        return np.asarray(im)
    if mode == "L":
        return _gray_to_rgb(np.asarray(im))
    if mode in _SIXTEEN_BIT_GREY_MODES:
        # Pillow's own I;16 -> L conversion clips at 255; scale the full 16-bit range instead.
        return _gray_to_rgb(_grey16_to_8(np.asarray(im)))
    if mode == "F":
        return _gray_to_rgb(np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8))
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im))
    return np.asarray(im.convert("RGB"))  # P, 1, YCbCr, HSV, LAB (Pillow converts LAB to sRGB), ...


def _cv2_to_rgb(arr: np.ndarray) -> np.ndarray:
    """cv2.imdecode(IMREAD_UNCHANGED) output (BGR order, any depth) -> RGB uint8."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.uint32:
        arr = (arr >> 24).astype(np.uint8)
    elif arr.dtype in (np.float32, np.float64):
        arr = np.clip(np.nan_to_num(arr) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2 or arr.shape[2] == 1:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.shape[2] == 4:
        bgr = arr[:, :, :3].astype(np.uint16)
        alpha = arr[:, :, 3:4].astype(np.uint16)
        arr = ((bgr * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3]), cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------------
# Size limits and reduced-size decoding
# ---------------------------------------------------------------------------------------------

def _check_pixels(width: int, height: int, max_pixels: int, fmt: str) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise DecodeError("too_large",
                          f"{fmt} image is {width}x{height} = {pixels / 1e6:.2f} MP, above the "
                          f"{max_pixels / 1e6:g} MP limit (max_pixels)")
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"{fmt} header gives an empty size {width}x{height}")


def _jpeg_reduction(width: int, height: int, max_side: int | None) -> int:
    """Largest DCT scale factor (8, 4, 2, 1) that keeps the longer side >= max_side."""
    if max_side is None:
        return 1
    longer = max(width, height)
    for factor in (8, 4, 2):
        if -(-longer // factor) >= max_side and width >= factor and height >= factor:
            return factor
    return 1


def _resize_to_max_side(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None:
        return arr
    height, width = arr.shape[:2]
    longer = max(width, height)
    if longer <= max_side:
        return arr
    ratio = max_side / longer
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    if width >= height:
        size = (max_side, size[1])
    else:
        size = (size[0], max_side)
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

_CV2_REDUCED_FLAGS = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                      8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _decode_jpeg_with_opencv(data: bytes, width: int, height: int, factor: int) -> np.ndarray | None:
    """Fast path for complete RGB/grey JPEGs; None when OpenCV cannot deliver the expected array."""
    # OpenCV decodes truncated JPEGs silently (grey bottom); only data that ends with the EOI
    # marker takes this path, everything else goes through Pillow, which reports truncation.
    if not data.endswith(b"\xff\xd9"):
        return None
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | _CV2_REDUCED_FLAGS[factor]
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    expected = (-(-height // factor), -(-width // factor), 3)
    if arr is None or arr.shape != expected or arr.dtype != np.uint8:
        return None
    return arr


def _load(im: Image.Image, data: bytes, fmt: str) -> None:
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"{fmt} image rejected by Pillow's size limit: {exc}") from exc
    except MemoryError as exc:
        raise DecodeError("too_large", f"{fmt} image {im.size[0]}x{im.size[1]}: out of memory while decoding") from exc
    except Exception as exc:  # decoders raise OSError/ValueError/SyntaxError/... on bad data
        if _is_truncation(exc) or _container_cut_short(data, fmt):
            raise DecodeError("truncated",
                              f"{fmt} data ends early (truncated after {len(data)} bytes; header says "
                              f"{im.size[0]}x{im.size[1]})") from exc
        if fmt == "TIFF":
            compression = str(im.info.get("compression", "unknown"))
            if not _libtiff_decodes(compression):
                raise DecodeError("unsupported_format",
                                  f"TIFF with {compression!r} compression: this Pillow/libtiff build has no "
                                  f"decoder for it") from exc
        raise DecodeError("corrupt", f"{fmt} pixel data is corrupt: {_exc_text(exc)}") from exc


@functools.cache
def _libtiff_decodes(compression: str) -> bool:
    """Whether this build's libtiff round-trips a tiny image with the given compression.

    libtiff codecs (WebP, ZSTD, LZMA, ...) are optional at build time and a missing one shows up only
    as "decoder error -2"; probing once tells "unsupported" from "corrupt" with evidence.
    """
    if compression in ("raw", "unknown"):
        return compression == "raw"
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "TIFF", compression=compression)
        buffer.seek(0)
        with Image.open(buffer) as probe:
            probe.load()
        return True
    except Exception:
        return False


def _tiff_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, orientation) from the first IFD of a TIFF/BigTIFF, without Pillow."""
    try:
        order = {b"II": "<", b"MM": ">"}[data[:2]]
        version = struct.unpack(order + "H", data[2:4])[0]
        if version == 42:
            offset = struct.unpack(order + "I", data[4:8])[0]
            count = struct.unpack(order + "H", data[offset:offset + 2])[0]
            entry_size, entries_at, value_at = 12, offset + 2, 8
        elif version == 43:
            offset = struct.unpack(order + "Q", data[8:16])[0]
            count = struct.unpack(order + "Q", data[offset:offset + 8])[0]
            entry_size, entries_at, value_at = 20, offset + 8, 12
        else:
            return None
        tags: dict[int, int] = {}
        type_formats = {3: "H", 4: "I", 16: "Q"}
        for i in range(min(count, 4096)):
            entry = data[entries_at + i * entry_size: entries_at + (i + 1) * entry_size]
            tag, field_type = struct.unpack(order + "HH", entry[:4])
            if tag in (256, 257, 274) and field_type in type_formats:
                fmt = type_formats[field_type]
                tags[tag] = struct.unpack(order + fmt, entry[value_at:value_at + struct.calcsize(fmt)])[0]
        if 256 not in tags or 257 not in tags:
            return None
        orientation = tags.get(274, 1)
        return tags[256], tags[257], orientation if 1 <= orientation <= 8 else 1
    except (KeyError, struct.error, IndexError):
        return None


def _decode_tiff_with_opencv(data: bytes, pillow_error: DecodeError, max_pixels: int,
                             max_side: int | None) -> DecodedImage:
    """TIFFs whose pixel layout Pillow cannot identify (e.g. 32-bit samples) but libtiff reads."""
    header = _tiff_header(data)
    if header is None:
        raise pillow_error
    width, height, orientation = header
    _check_pixels(width, height, max_pixels, "TIFF")  # bomb guard before OpenCV allocates
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        arr = None
    if arr is None or arr.shape[:2] != (height, width):
        raise pillow_error
    rgb = _apply_orientation(_resize_to_max_side(_cv2_to_rgb(arr), max_side), orientation)
    return _result(rgb, width, height, "TIFF", orientation)


def _result(rgb: np.ndarray, stored_width: int, stored_height: int, fmt: str, orientation: int) -> DecodedImage:
    width, height = (stored_height, stored_width) if orientation >= 5 else (stored_width, stored_height)
    rgb = np.ascontiguousarray(rgb)
    rgb.flags.writeable = False  # one contract for every path: Pillow's exported buffer is read-only
    return DecodedImage(rgb=rgb, width=width, height=height, scale=width / rgb.shape[1], format=fmt,
                        orientation=orientation)


@dataclass(frozen=True, slots=True)
class JpegPlan:
    """How a JPEG that a decoder outside this module (nvJPEG on the GPU) can take is to be
    decoded so that the result means what :func:`decode_image`'s does: stored size, EXIF
    orientation to apply, and the DCT reduction factor ``max_side`` asks for."""

    stored_width: int
    stored_height: int
    orientation: int
    factor: int

    @property
    def width(self) -> int:  # oriented full size, as DecodedImage.width
        return self.stored_height if self.orientation >= 5 else self.stored_width

    @property
    def height(self) -> int:
        return self.stored_width if self.orientation >= 5 else self.stored_height


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG's frame header, walking its marker segments;
    None when the header cannot be walked or the scan starts first."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            return (marker, data[pos + 4]) if pos + 4 < end else None
        pos += 2 + length
    return None


def plan_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> JpegPlan | None:
    """The plan of a complete baseline RGB or grey JPEG within ``max_pixels``, read from its
    header; None for anything else (progressive, lossless, arithmetic-coded, 12-bit, CMYK, cut
    short, too large, not a JPEG, a header Pillow refuses), which :func:`decode_image` must then
    decode or classify. Baseline and extended sequential Huffman 8-bit frames (SOF0, SOF1) are
    what nvJPEG decodes on the GPU."""
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    if _jpeg_frame(data) not in ((0xC0, 8), (0xC1, 8)):
        return None
    try:
        im = _open_header(bytes(data), "JPEG")
    except DecodeError:
        return None
    width, height = im.size
    if im.mode not in ("RGB", "L") or im.info.get("progressive") or im.info.get("progression"):
        return None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        return None
    return JpegPlan(width, height, _read_orientation(im), _jpeg_reduction(width, height, max_side))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> DecodedImage:
    """Decode image bytes to an oriented RGB array; raise :class:`DecodeError` on any bad input.

    ``max_pixels`` bounds width*height as stated by the header (checked before decoding).
    ``max_side`` asks for a reduced array (see the module notes); ``scale`` maps it back.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        raise DecodeError("not_image", "empty input (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not_image", f"not a recognised image format ({_describe_non_image(data)}; {len(data)} bytes)")

    try:
        im = _open_header(data, fmt)
    except DecodeError as error:
        if fmt == "TIFF" and error.status == "corrupt":
            return _decode_tiff_with_opencv(data, error, max_pixels, max_side)
        raise
    stored_width, stored_height = im.size
    _check_pixels(stored_width, stored_height, max_pixels, fmt)

    if fmt == "JPEG":
        orientation = _read_orientation(im)  # JPEG EXIF is parsed at open, no pixels needed
        factor = _jpeg_reduction(stored_width, stored_height, max_side)
        rgb = None
        if im.mode in ("RGB", "L"):
            rgb = _decode_jpeg_with_opencv(data, stored_width, stored_height, factor)
        if rgb is None:
            if factor > 1:
                im.draft(im.mode, (stored_width // factor, stored_height // factor))
            _load(im, data, fmt)
            rgb = _pillow_to_rgb(im)
    else:
        _load(im, data, fmt)
        orientation = _read_orientation(im)  # after load: PNG may keep eXIf after the pixel data
        rgb = _resize_to_max_side(_pillow_to_rgb(im), max_side)
    return _result(_apply_orientation(rgb, orientation), stored_width, stored_height, fmt, orientation)
