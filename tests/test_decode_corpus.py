"""facebatch.decode on every file of the shared corpus (../shared/data/faces); skips without it.

Each image file either decodes to the manifest's size (after EXIF orientation) or fails with the
specific status listed in EXPECTED_ERRORS; the evidence for each listed file is in the comment.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facebatch.decode import DecodeError, decode_image

GIANT_JPEG = "robustness/sharp/giant-image.jpg"

EXPECTED_ERRORS = {
    # 65536x65536 palette PNG (4295 MP) in 0.5 MB: rejected from the header, nothing decoded.
    "robustness/sharp/65536-uint32-limit.png": "too_large",
    # 2725x2225 JPEG cut to 10000 bytes: OpenCV "decodes" it to a mostly grey picture; we refuse.
    "robustness/sharp/truncated.jpg": "truncated",
    # Progressive JPEG missing its last bytes (Pillow: "8 bytes not processed").
    "robustness/pillow/truncated_jpeg.jpg": "truncated",
    # Ultra HDR file whose data stops 2 bytes after the primary image's SOS header: there is no
    # entropy-coded data at all (checked in test_ultrahdr_fixture_has_no_scan_data), so a decode
    # would be a uniform grey 1512x2688 picture.
    "robustness/pillow/ultrahdr.jpg": "truncated",
    # First 1024 bytes of a JPEG: the EXIF APP1 segment declares 9544 bytes, data ends inside it.
    "robustness/sharp/corrupt-header.jpg": "truncated",
    # PNGs cut short inside the pixel data.
    "robustness/sharp/truncated.png": "truncated",
    "robustness/pillow/truncated_image.png": "truncated",
    # Pixel data complete (equals hopper.png), but the file stops inside a trailing IDAT chunk and
    # has no IEND: a damaged object (Pillow and libpng both refuse it); re-fetching is the fix.
    "robustness/pillow/truncated_end_chunk.png": "truncated",
    # zlib stream decodes to invalid PNG filter bytes (libpng: "bad adaptive filter value").
    "robustness/pillow/broken_data_stream.png": "corrupt",
    # 80-byte PNG whose first chunk header is garbage.
    "robustness/pillow/broken.png": "corrupt",
    # TIFF with WebP compression: this Pillow's libtiff lacks the codec (probed at run time).
    "robustness/pillow/hopper_webp.tif": "unsupported_format",
}

# HEIF decodes only when the optional pillow-heif package is installed. The manifest has no size
# for it (its collector had no HEIF decoder); it is Pillow's 128x128 hopper like its siblings.
HEIF_FILE = "robustness/pillow/hopper.heif"
SIZES_MISSING_FROM_MANIFEST = {HEIF_FILE: (128, 128)}
# Files Pillow cannot open have no 'format' in the manifest.
FORMATS_MISSING_FROM_MANIFEST = {HEIF_FILE: "HEIF", "robustness/pillow/hopper_unknown_pixel_mode.tif": "TIFF"}


def _heif_plugin_available() -> bool:
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


def _outcome(data: bytes, path: str):
    # The giant JPEG's point here is its size, not a 280 MP decode: ask for a reduced decode.
    options = {"max_pixels": 300_000_000, "max_side": 2000} if path == GIANT_JPEG else {}
    try:
        return decode_image(data, **options)
    except DecodeError as error:
        return error


def test_every_manifest_file_has_the_expected_outcome(shared_data, shared_manifest):
    faces = shared_data / "faces"
    expected_errors = dict(EXPECTED_ERRORS)
    expected_errors[HEIF_FILE] = None if _heif_plugin_available() else "unsupported_format"
    problems = []
    seen_statuses: dict[str, str] = {}
    for entry in shared_manifest["files"]:
        path = entry["path"]
        outcome = _outcome((faces / path).read_bytes(), path)
        if entry["kind"] != "image":  # annotation XML/CSV/TXT files that sit beside the images
            expected_status = "not_image"
        else:
            expected_status = expected_errors.get(path)
        if isinstance(outcome, DecodeError):
            seen_statuses[path] = outcome.status
            if outcome.status != expected_status:
                problems.append(f"{path}: expected {expected_status or 'ok'}, got {outcome.status}: {outcome.message}")
            continue
        seen_statuses[path] = "ok"
        if expected_status is not None:
            problems.append(f"{path}: expected {expected_status}, decoded {outcome.width}x{outcome.height}")
            continue
        image_info = entry["image"]
        size = SIZES_MISSING_FROM_MANIFEST.get(path) or (image_info["width"], image_info["height"])
        if outcome.orientation >= 5:
            size = size[::-1]
        if (outcome.width, outcome.height) != size:
            problems.append(f"{path}: size {outcome.width}x{outcome.height}, expected {size[0]}x{size[1]}")
        manifest_orientation = image_info.get("exif_orientation") or 1
        if outcome.orientation != manifest_orientation:
            problems.append(f"{path}: orientation {outcome.orientation}, manifest {manifest_orientation}")
        expected_format = image_info.get("format") or FORMATS_MISSING_FROM_MANIFEST[path]
        if outcome.format != expected_format:
            problems.append(f"{path}: format {outcome.format}, expected {expected_format}")
        if outcome.rgb.dtype != np.uint8 or outcome.rgb.shape[2] != 3:
            problems.append(f"{path}: array {outcome.rgb.dtype} {outcome.rgb.shape}")
    assert not problems, "\n".join(problems)
    # Every listed error file exists in the manifest (the table cannot silently go stale).
    missing = set(expected_errors) - set(seen_statuses)
    assert not missing, missing


def test_every_robustness_file_on_disk_is_in_the_manifest(shared_data, shared_manifest):
    faces = shared_data / "faces"
    listed = {entry["path"] for entry in shared_manifest["files"]}
    on_disk = {str(p.relative_to(faces)) for p in (faces / "robustness").rglob("*") if p.is_file()}
    assert on_disk <= listed, on_disk - listed


def test_giant_jpeg_is_too_large_by_default_and_reduced_when_allowed(shared_data):
    data = (shared_data / "faces" / GIANT_JPEG).read_bytes()
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.status == "too_large"
    assert caught.value.message == ("JPEG image is 20000x14000 = 280.00 MP, above the 100 MP limit "
                                    "(max_pixels)")
    result = decode_image(data, max_pixels=280_000_000, max_side=2000)
    assert (result.width, result.height) == (20000, 14000)
    assert result.rgb.shape == (1750, 2500, 3)
    assert result.scale == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["Landscape", "Portrait"])
def test_all_exif_orientations_display_the_same_picture(shared_data, name):
    folder = shared_data / "faces" / "robustness" / "exif_orientation"
    upright = decode_image((folder / f"{name}_1.jpg").read_bytes()).rgb.astype(np.int16)
    for orientation in range(0, 9):
        result = decode_image((folder / f"{name}_{orientation}.jpg").read_bytes(), max_side=None)
        assert result.rgb.shape == upright.shape
        # Same photo re-encoded: ~2-4 levels mean difference; a wrong orientation gives tens.
        assert np.abs(result.rgb.astype(np.int16) - upright).mean() < 8, (name, orientation)


@pytest.mark.parametrize("extension", ["jpg", "webp"])
def test_hopper_orientations_display_the_same_face(shared_data, extension):
    folder = shared_data / "faces" / "robustness" / "pillow"
    upright = decode_image((folder / "hopper.jpg").read_bytes()).rgb.astype(np.int16)
    for orientation in range(2, 9):
        result = decode_image((folder / f"hopper_orientation_{orientation}.{extension}").read_bytes())
        assert result.orientation == orientation
        assert np.abs(result.rgb.astype(np.int16) - upright).mean() < 10, orientation


def test_tiff_and_png_variants_match_the_reference_pixels(shared_data):
    folder = shared_data / "faces" / "robustness" / "pillow"
    reference = decode_image((folder / "hopper.png").read_bytes()).rgb.astype(np.int16)
    exact = ["hopper.tif", "hopper_lzw.tif", "hopper_lzma.tif", "hopper_bigtiff.tif", "hopper.bmp",
             "hopper_idat_after_image_end.png",
             "hopper_unknown_pixel_mode.tif"]  # 32-bit samples: Pillow cannot open it, OpenCV can
    for name in exact:
        np.testing.assert_array_equal(decode_image((folder / name).read_bytes()).rgb, reference, err_msg=name)
    near = ["hopper.Lab.tif", "hopper_jpg.tif", "hopper.webp", "hopper.avif", "hopper.gif"]
    for name in near:
        difference = np.abs(decode_image((folder / name).read_bytes()).rgb.astype(np.int16) - reference).mean()
        assert difference < 6, (name, difference)


def test_truncated_end_chunk_png_really_has_complete_pixels_but_is_cut(shared_data):
    folder = shared_data / "faces" / "robustness" / "pillow"
    data = (folder / "truncated_end_chunk.png").read_bytes()
    assert b"IEND" not in data
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.status == "truncated"


def test_ultrahdr_fixture_has_no_scan_data(shared_data):
    data = (shared_data / "faces" / "robustness" / "pillow" / "ultrahdr.jpg").read_bytes()
    start_of_scan = data.rindex(b"\xff\xda")  # the last SOS: earlier ones sit in the EXIF thumbnail
    header_length = int.from_bytes(data[start_of_scan + 2:start_of_scan + 4], "big")
    assert len(data) - (start_of_scan + 2 + header_length) < 4  # nothing after the SOS header
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.status == "truncated"


def test_cmyk_with_profile_uses_the_profile(shared_data):
    folder = shared_data / "faces" / "robustness" / "sharp"
    with_profile = decode_image((folder / "Channel_digital_image_CMYK_color.jpg").read_bytes()).rgb
    naive = np.asarray(Image.open(folder / "Channel_digital_image_CMYK_color.jpg").convert("RGB"))
    without_profile = decode_image((folder / "Channel_digital_image_CMYK_color_no_profile.jpg").read_bytes()).rgb
    np.testing.assert_array_equal(without_profile, naive)
    # Naive CMYK->RGB oversaturates the green park; the profile's rendering is visibly different.
    assert np.abs(with_profile.astype(np.int16) - naive).mean() > 5


def test_sixteen_bit_flag_keeps_its_colours(shared_data):
    data = (shared_data / "faces" / "robustness" / "sharp" / "Flag_of_the_Netherlands-16bit.png").read_bytes()
    rgb = decode_image(data).rgb
    top, middle, bottom = rgb[50, 450], rgb[300, 450], rgb[550, 450]
    assert top[0] > 150 and top[1] < 80 and top[2] < 80  # red
    assert min(middle) > 240  # white
    assert bottom[2] > 100 and bottom[0] < 60  # blue


def test_lying_extensions_in_the_corpus(shared_data):
    faces = shared_data / "faces"
    assert decode_image((faces / "detection/insightface/kun.jpg").read_bytes()).format == "PNG"
    assert decode_image((faces / "identity/deepface/img47.jpg").read_bytes(), max_side=500).format == "WEBP"
