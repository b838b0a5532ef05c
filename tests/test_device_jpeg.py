"""GPU JPEG decoding (--gpu-jpeg-decode), everything around the nvJPEG call, on the CPU.

nvJPEG itself needs a GPU (bench/gpu_check.py measures it there: pixel and detection parity with
the CPU decoder, images/s). Here the batch decoder behind DeviceJpegDecoder is libjpeg through
OpenCV, with nvJPEG's interface (3xHxW uint8 in stored orientation), so what this project adds
around nvJPEG runs for real: which files are passed on undecoded, orientation and DCT-size
reduction, the CPU fallback that classifies bad files, and the actor's rows.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from facebatch.decode import JpegPlan, _apply_orientation, decode_image, plan_jpeg
from facebatch.device_jpeg import (DeviceJpegDecoder, NvJpegUnavailable, nvjpeg_batch_decoder,
                                   opencv_batch_decode, orient)
from facebatch.reading import batch_images, fetch_and_decode
from test_decode import encode, exif_with_orientation, noise_image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_the_cpu_decoders(orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(orient(torch.from_numpy(rgb), orientation).numpy(), _apply_orientation(rgb, orientation))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_full_size_decode_gives_the_cpu_decoders_array(orientation):
    data = encode(noise_image(64, 48), "JPEG", quality=90, exif=exif_with_orientation(orientation))
    want = decode_image(data)
    got = DeviceJpegDecoder(opencv_batch_decode).decode([data])[0]
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want.rgb)


def test_reduction_has_the_dct_scaled_size_and_nearly_its_pixels(astronaut_rgb):
    # 1536 x 1024 with max_side 300: the CPU decoder scales the DCT by 1/4 (384 x 256).
    big = cv2.resize(astronaut_rgb, (1536, 1024), interpolation=cv2.INTER_CUBIC)
    data = encode(Image.fromarray(big), "JPEG", quality=92, exif=exif_with_orientation(6))
    want = decode_image(data, max_side=300)
    assert plan_jpeg(data, max_side=300).factor == 4
    got = DeviceJpegDecoder(opencv_batch_decode, max_side=300).decode([data])[0].numpy()
    assert got.shape == want.rgb.shape == (384, 256, 3)
    # A box average is not libjpeg's scaled IDCT: measured on the shared corpus, 0.27 grey
    # levels apart on average (at most 0.58 for one photo).
    diff = np.abs(got.astype(int) - want.rgb.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


def test_plan_takes_only_what_nvjpeg_decodes():
    image = noise_image(40, 30)
    baseline = encode(image, "JPEG")
    assert plan_jpeg(baseline) == JpegPlan(40, 30, 1, 1)
    assert plan_jpeg(encode(image.convert("L"), "JPEG")) == JpegPlan(40, 30, 1, 1)
    rotated = plan_jpeg(encode(image, "JPEG", exif=exif_with_orientation(6)))
    assert (rotated.width, rotated.height, rotated.orientation) == (30, 40, 6)
    assert plan_jpeg(encode(image, "JPEG", progressive=True)) is None
    assert plan_jpeg(encode(image.convert("CMYK"), "JPEG")) is None
    assert plan_jpeg(baseline[:-200]) is None  # cut short: the CPU decoder says 'truncated'
    assert plan_jpeg(encode(image, "PNG")) is None
    assert plan_jpeg(baseline, max_pixels=40 * 30 - 1) is None  # the CPU decoder says 'too_large'
    assert plan_jpeg(b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9") is None
    # Frame types nvJPEG does not decode, which Pillow reads as plain RGB: lossless (SOF3) and
    # arithmetic-coded (SOF9) frames; the frame marker is what the plan goes by.
    sof0 = baseline.index(b"\xff\xc0")
    for marker in (b"\xff\xc3", b"\xff\xc9"):
        assert plan_jpeg(baseline[:sof0] + marker + baseline[sof0 + 2 :]) is None


def test_reduction_in_strips_and_decoding_in_bounded_calls(monkeypatch, astronaut_rgb):
    """Big photos: the reduction works in strips of rows and the files of a batch go to the
    batch decoder in calls of bounded size; neither changes a pixel."""
    from facebatch import device_jpeg

    files = [encode(Image.fromarray(np.ascontiguousarray(astronaut_rgb[: 500 - 37 * k])), "JPEG", quality=90)
             for k in range(3)]
    whole = DeviceJpegDecoder(opencv_batch_decode, max_side=100).decode(files)
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return opencv_batch_decode(batch)

    monkeypatch.setattr(device_jpeg, "_REDUCE_ROWS", 16)
    bounded = DeviceJpegDecoder(counting, max_side=100, call_bytes=512 * 512 * 3).decode(files)
    assert calls == [1, 1, 1]
    for a, b in zip(whole, bounded):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_nvjpeg_refuses_to_start_without_cuda():
    with pytest.raises(NvJpegUnavailable, match="needs CUDA inference actors"):
        nvjpeg_batch_decoder("cpu")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, astronaut_rgb):
    """A small archive: JPEGs the device path takes (two orientations, grey), and files it
    leaves to the CPU decoder (PNG, progressive, CMYK, a JPEG cut short, garbage)."""
    folder = tmp_path_factory.mktemp("photos")
    face = Image.fromarray(astronaut_rgb)
    baseline = encode(face, "JPEG", quality=90)
    files = {
        "upright.jpg": baseline,
        "turned.jpg": encode(face.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif_with_orientation(6)),
        "grey.jpg": encode(face.convert("L"), "JPEG", quality=90),
        "face.png": encode(face, "PNG"),
        "progressive.jpg": encode(face, "JPEG", progressive=True),
        "cmyk.jpg": encode(face.convert("CMYK"), "JPEG"),
        "cut.jpg": baseline[: len(baseline) // 2],
        # Header and end marker intact, the scan data wiped: passed on, and only a decoder can tell.
        "wiped.jpg": baseline[:700] + b"\x00" * (len(baseline) - 702) + b"\xff\xd9",
        "notes.jpg": b"just some text, no image at all",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rows = [{"image_id": name, "uri": str(folder / name), "etag": "e", "size": len(data)} for name, data in files.items()]
    return pa.Table.from_pylist(rows)


def _read(batch, passthrough):
    return fetch_and_decode(batch, retries=0, endpoint=None, max_pixels=100_000_000, max_side=2048,
                            jpeg_passthrough=passthrough)


def test_read_task_passes_on_only_the_jpegs_the_device_takes(photo_files):
    decoded = _read(photo_files, True)
    by_name = {r["image_id"]: r for r in decoded.to_pylist()}
    passed_on = {name for name, r in by_name.items() if r["encoded"] is not None}
    assert passed_on == {"upright.jpg", "turned.jpg", "grey.jpg", "wiped.jpg"}
    for name in passed_on:
        r = by_name[name]
        assert r["status"] == "ok" and r["pixels"] is None and r["format"] == "JPEG"
    plain = {r["image_id"]: r for r in _read(photo_files, False).to_pylist()}
    assert (by_name["turned.jpg"]["width"], by_name["turned.jpg"]["height"]) == (
        plain["turned.jpg"]["width"], plain["turned.jpg"]["height"])
    for name in set(by_name) - passed_on:  # decoded (or classified) on the CPU as before
        assert {k: by_name[name][k] for k in ("status", "error", "pix_h", "pixels")} == {
            k: plain[name][k] for k in ("status", "error", "pix_h", "pixels")}


@pytest.mark.parametrize("device_decoder", ["libjpeg", None])
def test_actor_rows_equal_the_cpu_decoders(photo_files, device_decoder):
    """The actor's rows with passed-on JPEGs equal those of the plain path: same statuses and
    errors (a passed-on file no decoder can read is classified by the CPU decoder), same faces."""
    from facebatch.inference import FaceAnalyzer
    from facebatch.pipeline import FaceModelActor

    analyzer = FaceAnalyzer(device="cpu", embed=False)

    def run(batch, decoder):
        actor = FaceModelActor.__new__(FaceModelActor)
        actor.embed, actor.decode, actor.analyzer = False, None, analyzer
        actor.jpeg_decoder, actor.limits = decoder, {"max_pixels": 100_000_000, "max_side": 2048}
        return actor(batch)

    plain = run(_read(photo_files, False), None)
    decoder = DeviceJpegDecoder(opencv_batch_decode, max_side=2048) if device_decoder else None
    passed = run(_read(photo_files, True), decoder)
    assert "encoded" not in passed.column_names and "pixels" not in passed.column_names
    for column in ("image_id", "status", "error", "width", "height", "format", "num_faces"):
        assert passed[column].to_pylist() == plain[column].to_pylist(), column
    assert passed["status"].to_pylist().count("ok") == 7  # all but the cut file and the text
    boxes = [[f["box"] for f in faces] for faces in passed["faces"].to_pylist()]
    want = [[f["box"] for f in faces] for faces in plain["faces"].to_pylist()]
    for got_boxes, want_boxes in zip(boxes, want):
        np.testing.assert_allclose(np.array(got_boxes or np.zeros((0, 4))), np.array(want_boxes or np.zeros((0, 4))),
                                   atol=1e-3)


def test_a_passed_on_file_no_decoder_reads_becomes_an_error_row(photo_files):
    """Defence in depth: should a passed-on file fail every decoder, its row gets the CPU
    decoder's status and message and loses the header's facts, and the batch goes on."""
    decoded = _read(photo_files, True)
    names = decoded["image_id"].to_pylist()
    encoded = decoded["encoded"].to_pylist()
    broken = names.index("upright.jpg")
    encoded[broken] = encoded[broken][:300]  # a header and nothing else
    decoded = decoded.set_column(decoded.column_names.index("encoded"), "encoded",
                                 pa.array(encoded, decoded.schema.field("encoded").type))
    status = decoded["status"].to_pylist()
    errors = decoded["error"].to_pylist()
    refusing = DeviceJpegDecoder(lambda files: [None] * len(files))  # nvJPEG refused them all
    ok_idx, images, scales, failed = batch_images(decoded, status, errors, max_pixels=100_000_000, max_side=2048,
                                                  device_decoder=refusing)
    assert failed == [broken] and status[broken] == "truncated" and errors[broken]
    assert broken not in ok_idx and len(images) == len(scales) == status.count("ok")
    from facebatch.pipeline import _clear_image_facts

    cleared = _clear_image_facts(decoded, failed)
    assert [cleared[c][broken].as_py() for c in ("width", "height", "format")] == [None, None, None]
    assert cleared["width"].to_pylist()[:broken] == decoded["width"].to_pylist()[:broken]
