"""facebatch.decode on images generated here (Pillow/numpy/OpenCV); no shared corpus needed."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from facebatch.decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, decode_image, sniff_format

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def assert_output_contract(result: DecodedImage) -> None:
    assert result.rgb.dtype == np.uint8
    assert result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert result.rgb.flags.c_contiguous
    assert not result.rgb.flags.writeable
    assert result.scale == pytest.approx(result.width / result.rgb.shape[1])
    assert result.scale >= 1.0


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------

def corner_marked_image(width: int = 48, height: int = 32) -> Image.Image:
    """Grey image, red block in the stored top-left corner, green block in the stored top-right."""
    pixels = np.full((height, width, 3), GREY, np.uint8)
    pixels[:8, :8] = RED
    pixels[:8, -8:] = GREEN
    return Image.fromarray(pixels)


# Where the stored top-left and top-right corners appear on screen, from the EXIF definition of
# each orientation ("row 0 is the visual ..., column 0 is the visual ...").
DISPLAY_CORNERS = {
    1: ("top_left", "top_right"),
    2: ("top_right", "top_left"),
    3: ("bottom_right", "bottom_left"),
    4: ("bottom_left", "bottom_right"),
    5: ("top_left", "bottom_left"),
    6: ("top_right", "bottom_right"),
    7: ("bottom_right", "top_right"),
    8: ("bottom_left", "top_left"),
}


def corner_colour(rgb: np.ndarray, corner: str) -> tuple[int, ...]:
    height, width = rgb.shape[:2]
    y = 3 if corner.startswith("top") else height - 4
    x = 3 if corner.endswith("left") else width - 4
    return tuple(int(v) for v in rgb[y, x])


def assert_close_colour(actual, expected, tolerance=40):
    assert max(abs(a - e) for a, e in zip(actual, expected)) <= tolerance, (actual, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_places_pixels_where_the_viewer_shows_them(fmt, orientation):
    stored = corner_marked_image()
    params = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = encode(stored, fmt, exif=exif_with_orientation(orientation), **params)

    result = decode_image(data)

    assert_output_contract(result)
    assert result.orientation == orientation
    expected_size = (32, 48) if orientation >= 5 else (48, 32)
    assert (result.width, result.height) == expected_size
    assert result.rgb.shape[:2] == (expected_size[1], expected_size[0])
    red_corner, green_corner = DISPLAY_CORNERS[orientation]
    assert_close_colour(corner_colour(result.rgb, red_corner), RED)
    assert_close_colour(corner_colour(result.rgb, green_corner), GREEN)
    if fmt != "JPEG":  # lossless: the whole array equals Pillow's own exif_transpose
        reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        np.testing.assert_array_equal(result.rgb, reference)


def test_garbled_exif_block_falls_back_to_orientation_one():
    jpeg = encode(noise_image(40, 30), "JPEG")
    garbage = b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\xff\xff" + bytes(range(7, 40))
    app1 = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    data = jpeg[:2] + app1 + jpeg[2:]

    result = decode_image(data)

    assert result.orientation == 1
    assert (result.width, result.height) == (40, 30)


def test_out_of_range_orientation_value_is_ignored():
    data = encode(corner_marked_image(), "PNG", exif=exif_with_orientation(9))
    result = decode_image(data)
    assert result.orientation == 1
    assert corner_colour(result.rgb, "top_left") == RED


# ---------------------------------------------------------------------------------------------
# Colour modes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_to_rgb(fmt):
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    result = decode_image(encode(cyan, fmt))
    assert_close_colour(tuple(result.rgb[16, 16]), (0, 255, 255), tolerance=3)


def test_adobe_inverted_cmyk_jpeg_is_not_shown_as_a_negative():
    data = encode(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG")  # Pillow writes Adobe-inverted CMYK
    assert Image.open(io.BytesIO(data)).tile[0].args[0] == "CMYK;I"
    assert_close_colour(tuple(decode_image(data).rgb[16, 16]), (255, 255, 255), tolerance=3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(fmt):
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)), "L")
    result = decode_image(encode(gray, fmt))
    assert result.rgb.shape == (16, 64, 3)
    np.testing.assert_array_equal(result.rgb[..., 0], result.rgb[..., 1])
    np.testing.assert_array_equal(result.rgb[..., 0], result.rgb[..., 2])
    if fmt == "PNG":
        np.testing.assert_array_equal(result.rgb[..., 0], np.asarray(gray))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index_shows_white_there(fmt):
    palette_image = Image.new("P", (20, 10), 1)
    palette_image.putpalette([0, 0, 0] + list(BLUE) + [0, 0, 0] * 254)
    palette_image.paste(0, (0, 0, 10, 10))  # left half: index 0 (black, declared transparent)
    result = decode_image(encode(palette_image, fmt, transparency=0))
    assert tuple(result.rgb[5, 15]) == BLUE
    assert tuple(result.rgb[5, 2]) == (255, 255, 255)


def test_rgba_is_composited_on_white():
    pixels = np.zeros((10, 30, 4), np.uint8)
    pixels[:, :10] = (255, 0, 0, 255)  # opaque red
    pixels[:, 10:20] = (255, 0, 0, 128)  # half-transparent red
    pixels[:, 20:] = (0, 0, 0, 0)  # fully transparent black
    result = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert tuple(result.rgb[5, 5]) == RED
    assert_close_colour(tuple(result.rgb[5, 15]), (255, 127, 127), tolerance=2)
    assert tuple(result.rgb[5, 25]) == (255, 255, 255)


def test_grey_alpha_is_composited_on_white():
    grey_alpha = Image.merge("LA", [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 0)])
    assert tuple(decode_image(encode(grey_alpha, "PNG")).rgb[4, 4]) == (255, 255, 255)


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    result = decode_image(data)
    assert result.rgb[0, :, 0].tolist() == [0, 10, 128, 255]


def test_sixteen_bit_rgb_png_is_scaled_not_clipped():
    values = np.array([0, 257 * 10, 32768, 65535], dtype=np.uint16)
    bgr = np.zeros((1, 4, 3), np.uint16)
    bgr[0, :, 2] = values  # red channel (OpenCV writes BGR)
    bgr[0, :, 1] = values[::-1]  # green channel, reversed
    ok, encoded = cv2.imencode(".png", bgr)
    assert ok
    result = decode_image(encoded.tobytes())
    assert result.rgb[0, :, 0].tolist() == [0, 10, 128, 255]
    assert result.rgb[0, :, 1].tolist() == [255, 128, 10, 0]
    assert result.rgb[0, :, 2].tolist() == [0, 0, 0, 0]


def test_sixteen_bit_grey_tiff_is_scaled_not_clipped():
    values = np.array([[0, 257 * 200, 65535]], dtype=np.uint16)
    result = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert result.rgb[0, :, 1].tolist() == [0, 200, 255]


@pytest.mark.parametrize("fmt,params", [("BMP", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                        ("TIFF", {"compression": "jpeg"}), ("WEBP", {"lossless": True}),
                                        ("GIF", {}), ("PNG", {}), ("PPM", {}), ("JPEG2000", {})])
def test_other_formats_decode_to_the_same_size(fmt, params):
    if fmt == "JPEG2000" and not features.check("jpg_2000"):
        pytest.skip("Pillow built without OpenJPEG")
    image = corner_marked_image(36, 20)
    result = decode_image(encode(image, fmt, **params))
    assert result.format == fmt
    assert (result.width, result.height) == (36, 20)
    assert_close_colour(corner_colour(result.rgb, "top_left"), RED)


def test_avif_decodes_natively_in_pillow():
    if not features.check("avif"):
        pytest.skip("Pillow built without libavif")
    result = decode_image(encode(corner_marked_image(), "AVIF", quality=90))
    assert result.format == "AVIF"
    assert (result.width, result.height) == (48, 32)
    assert_close_colour(corner_colour(result.rgb, "top_right"), GREEN, tolerance=60)


def test_heif_needs_the_optional_plugin():
    heif_header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert sniff_format(heif_header) == "HEIF"
    with pytest.raises(DecodeError) as caught:
        decode_image(heif_header)
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        assert caught.value.status == "unsupported_format"
        assert "pillow-heif" in caught.value.message
    else:  # the plugin is there, so this header-only file is broken data
        assert caught.value.status in ("corrupt", "truncated")


# ---------------------------------------------------------------------------------------------
# Format recognition from bytes
# ---------------------------------------------------------------------------------------------

def test_format_comes_from_the_bytes_not_the_file_name(tmp_path):
    png_named_jpg = tmp_path / "photo.jpg"
    png_named_jpg.write_bytes(encode(corner_marked_image(), "PNG"))
    webp_named_png = tmp_path / "photo.png"
    webp_named_png.write_bytes(encode(corner_marked_image(), "WEBP"))
    assert decode_image(png_named_jpg.read_bytes()).format == "PNG"
    assert decode_image(webp_named_png.read_bytes()).format == "WEBP"


@pytest.mark.parametrize("fmt,params", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}),
                                        ("TIFF", {}), ("TIFF", {"big_tiff": True}), ("PPM", {}), ("ICO", {})])
def test_sniff_format_recognises_magic_bytes(fmt, params):
    assert sniff_format(encode(Image.new("RGB", (16, 16)), fmt, **params)) == fmt


def test_sniff_format_rejects_non_images():
    assert sniff_format(b"") is None
    assert sniff_format(b"<!DOCTYPE html><html></html>") is None
    assert sniff_format(b"BM but not a bitmap at all........") is None
    assert sniff_format(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") is None  # MP4 video


@pytest.mark.parametrize("data,expected_words", [
    (b"", "empty"),
    (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "HTML"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40, "ZIP"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
    (b"just some words in a text file\n", "text"),
    (np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "bytes"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 32, "ISO media"),
])
def test_non_images_are_not_image_with_a_helpful_message(data, expected_words):
    if data[:1] in (b"\xff", b"\x89"):  # the random bytes must not start like a real format
        data = b"\x01" + data
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.status == "not_image"
    assert expected_words in caught.value.message


# ---------------------------------------------------------------------------------------------
# Decompression-bomb guard
# ---------------------------------------------------------------------------------------------

def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit RGB) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def test_bomb_header_is_rejected_before_decoding():
    data = png_header_only(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.status == "too_large"
    assert caught.value.message == ("PNG image is 100000x100000 = 10000.00 MP, above the 100 MP limit "
                                    "(max_pixels)")


def test_max_pixels_limit_is_inclusive_and_configurable():
    data = encode(noise_image(100, 50), "PNG")
    assert decode_image(data, max_pixels=5000).width == 100
    with pytest.raises(DecodeError) as caught:
        decode_image(data, max_pixels=4999)
    assert caught.value.status == "too_large"
    assert "100x50" in caught.value.message and "0.004999 MP limit" in caught.value.message


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim width x height; scan data cut."""
    data = bytearray(encode(noise_image(64, 64), "JPEG", quality=50))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    sos = data.index(b"\xff\xda")
    return bytes(data[:sos + 200])


def test_our_limit_decides_not_pillows_global_one():
    data = jpeg_claiming_size(20_000, 20_000)  # 400 MP: Pillow's Image.open refuses it outright
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with pytest.raises(DecodeError) as caught:
        decode_image(data, max_pixels=500_000_000, max_side=2000)
    # The size was accepted (our limit) and decoding went on until the data ran out.
    assert caught.value.status == "truncated"


def test_decoding_leaves_pillow_globals_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for data in (png_header_only(100_000, 100_000), jpeg_claiming_size(20_000, 20_000)):
        with pytest.raises(DecodeError):
            decode_image(data, max_pixels=500_000_000, max_side=2000)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert DEFAULT_MAX_PIXELS == 100_000_000


# ---------------------------------------------------------------------------------------------
# Truncated and corrupt data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "AVIF"])
def test_truncated_data_is_reported_as_truncated(fmt):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow built without libavif")
    data = encode(noise_image(256, 256), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(DecodeError) as caught:
        decode_image(cut)
    assert caught.value.status == "truncated", caught.value.message
    assert "ends early" in caught.value.message
    if fmt != "GIF":
        assert f"after {len(cut)} bytes" in caught.value.message


def test_jpeg_missing_only_its_end_marker_is_truncated():
    data = encode(noise_image(64, 64), "JPEG")
    with pytest.raises(DecodeError) as caught:
        decode_image(data[:-2])
    assert caught.value.status == "truncated"


def test_data_cut_inside_the_header_is_truncated():
    data = encode(noise_image(64, 64), "JPEG", exif=exif_with_orientation(6))
    with pytest.raises(DecodeError) as caught:
        decode_image(data[:30])
    assert caught.value.status == "truncated"
    assert "header" in caught.value.message


def test_corrupt_png_pixel_data_is_corrupt():
    data = bytearray(encode(noise_image(64, 64), "PNG", compress_level=0))
    idat = data.index(b"IDAT")
    data[idat + 4 + 2 + 5] = 0x37  # first filter byte of the stored zlib block: 0x37 is no PNG filter
    payload = bytes(data[idat:idat + 4 + struct.unpack(">I", data[idat - 4:idat])[0]])
    data[idat + len(payload): idat + len(payload) + 4] = struct.pack(">I", zlib.crc32(payload))
    with pytest.raises(DecodeError) as caught:
        decode_image(bytes(data))
    assert caught.value.status == "corrupt"


def test_garbage_after_the_png_signature_is_corrupt():
    with pytest.raises(DecodeError) as caught:
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(range(200, 256)) * 2)
    assert caught.value.status == "corrupt"


# ---------------------------------------------------------------------------------------------
# Reduced-size decoding and scale
# ---------------------------------------------------------------------------------------------

def image_with_white_square(width=1600, height=1200, box=(1000, 600, 1100, 700)) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def white_square_centre(rgb: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(rgb[..., 0] > 128)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


@pytest.mark.parametrize("max_side,expected_factor", [(None, 1), (1601, 1), (1000, 1), (800, 2), (400, 4),
                                                      (200, 8), (10, 8)])
def test_reduced_jpeg_decode_keeps_the_longer_side_at_least_max_side(max_side, expected_factor):
    data = encode(image_with_white_square(), "JPEG", quality=95)
    result = decode_image(data, max_side=max_side)
    assert (result.width, result.height) == (1600, 1200)
    assert result.rgb.shape == (1200 // expected_factor, 1600 // expected_factor, 3)
    assert result.scale == pytest.approx(expected_factor)
    if max_side is not None and max_side <= 1600:
        assert max(result.rgb.shape[:2]) >= max_side
    centre_x, centre_y = white_square_centre(result.rgb)
    assert centre_x * result.scale == pytest.approx(1050, abs=expected_factor)
    assert centre_y * result.scale == pytest.approx(650, abs=expected_factor)


def test_reduced_decode_scale_refers_to_the_oriented_full_image():
    data = encode(image_with_white_square(), "JPEG", quality=95, exif=exif_with_orientation(6))
    result = decode_image(data, max_side=400)
    assert (result.width, result.height) == (1200, 1600)
    assert result.rgb.shape == (400, 300, 3)
    centre_x, centre_y = white_square_centre(result.rgb)
    # Rotating 90 degrees clockwise sends stored (x, y) to display (height - y, x).
    assert centre_x * result.scale == pytest.approx(1200 - 650, abs=4)
    assert centre_y * result.scale == pytest.approx(1050, abs=4)


def test_reduced_decode_rounds_odd_sizes_up():
    data = encode(noise_image(2725, 1113), "JPEG")
    result = decode_image(data, max_side=340)
    assert result.rgb.shape == (140, 341, 3)  # ceil(1113 / 8), ceil(2725 / 8)
    assert result.scale == pytest.approx(2725 / 341)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_max_side_downscales_other_formats_exactly(fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(image_with_white_square(), fmt, **params)
    result = decode_image(data, max_side=400)
    assert (result.width, result.height) == (1600, 1200)
    assert result.rgb.shape == (300, 400, 3)
    assert result.scale == pytest.approx(4.0)
    centre_x, centre_y = white_square_centre(result.rgb)
    assert centre_x * result.scale == pytest.approx(1050, abs=4)
    assert centre_y * result.scale == pytest.approx(650, abs=4)


def test_max_side_never_upscales():
    result = decode_image(encode(noise_image(120, 80), "PNG"), max_side=1000)
    assert result.rgb.shape == (80, 120, 3)
    assert result.scale == 1.0


@pytest.mark.parametrize("max_side", [None, 300])
def test_opencv_fast_path_and_pillow_path_give_identical_pixels(max_side):
    data = encode(noise_image(1200, 900, seed=3), "JPEG", quality=90)
    fast = decode_image(data, max_side=max_side)  # ends with EOI: OpenCV path
    slow = decode_image(data + b"\x00\x00", max_side=max_side)  # trailing bytes: Pillow path
    np.testing.assert_array_equal(fast.rgb, slow.rgb)
    assert fast.scale == slow.scale
    reference = Image.open(io.BytesIO(data))
    if max_side:
        reference.draft("RGB", (reference.width // 4, reference.height // 4))
    np.testing.assert_array_equal(fast.rgb, np.asarray(reference.convert("RGB")))


# ---------------------------------------------------------------------------------------------
# Input types, validation, threads
# ---------------------------------------------------------------------------------------------

def test_bytes_like_inputs_are_accepted():
    data = encode(corner_marked_image(), "PNG")
    for view in (bytearray(data), memoryview(data)):
        assert decode_image(view).rgb.shape == (32, 48, 3)


def test_invalid_arguments_are_programming_errors():
    data = encode(corner_marked_image(), "PNG")
    with pytest.raises(ValueError):
        decode_image(data, max_pixels=0)
    with pytest.raises(ValueError):
        decode_image(data, max_side=0)
    with pytest.raises(ValueError):
        DecodeError("exploded", "not a status")


def test_decode_error_carries_status_and_message():
    error = DecodeError("corrupt", "JPEG pixel data is corrupt")
    assert (error.status, error.message) == ("corrupt", "JPEG pixel data is corrupt")
    assert str(error) == "corrupt: JPEG pixel data is corrupt"


def test_concurrent_decodes_match_sequential_ones():
    inputs = [encode(noise_image(300, 200, seed=i), fmt, exif=exif_with_orientation(1 + i % 8))
              for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG"] * 4)]
    inputs.append(encode(noise_image(300, 200), "JPEG")[:1000])
    sequential = [_outcome(data) for data in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(_outcome, inputs * 3))
    assert concurrent == sequential * 3


def _outcome(data: bytes):
    try:
        result = decode_image(data, max_side=150)
    except DecodeError as error:
        return error.status
    return result.width, result.height, result.orientation, result.rgb.tobytes()
