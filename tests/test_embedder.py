"""The embedder against dlib itself (dlib-bin, test-only) on real faces, plus the reader, the
alignment geometry and the public API. Self-contained: needs no ../shared data."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import torch

from facebatch.alignment import (
    DLIB_SHAPE5_TEMPLATE,
    MTCNN_TEMPLATE,
    align_faces,
    chip_to_source_transforms,
    similarity_transforms,
)
from facebatch.dlib_model import (
    EXPECTED_PARAMETER_COUNT,
    DlibModelFormatError,
    default_model_path,
    parse_dlib_resnet,
    read_dlib_resnet,
    zero_pad_add,
)
from facebatch.embedder import EMBEDDING_DIM, FaceEmbedder

dlib = pytest.importorskip("dlib", reason="dlib-bin is the parity reference (test extra)")


@pytest.fixture(scope="module")
def dlib_models():
    models = default_model_path().parent
    return {
        "detector": dlib.get_frontal_face_detector(),
        "shape5": dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
        "shape68": dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat")),
        "resnet": dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")),
    }


@pytest.fixture(scope="module")
def embedder():
    return FaceEmbedder(device="cpu")


def _variants(astronaut: np.ndarray) -> dict[str, np.ndarray]:
    """Real photo plus photometric/geometric variants, including faces far bigger than the chip
    (2.5x, 4x: dlib cuts those from its image pyramid) and smaller ones."""
    h, w = astronaut.shape[:2]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 3), 15, 1.0)
    ok, jpeg = cv2.imencode(".jpg", astronaut[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 35])
    assert ok
    noise = np.random.default_rng(0).normal(0, 12, astronaut.shape)
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    return {
        "original": astronaut,
        "mirror": np.ascontiguousarray(astronaut[:, ::-1]),
        "darker": (astronaut * 0.55).astype(np.uint8),
        "brighter": np.clip(astronaut.astype(np.int32) + 45, 0, 255).astype(np.uint8),
        "gamma": (255 * (astronaut / 255.0) ** 1.8).astype(np.uint8),
        "gray": np.stack([gray] * 3, axis=-1),
        "jpeg_q35": np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]),
        "noise": np.clip(astronaut + noise, 0, 255).astype(np.uint8),
        "rotated_15": cv2.warpAffine(astronaut, rotation, (w, h)),
        "half": cv2.resize(astronaut, (w // 2, h // 2), interpolation=cv2.INTER_AREA),
        "x2_5": cv2.resize(astronaut, (w * 5 // 2, h * 5 // 2), interpolation=cv2.INTER_CUBIC),
        "x4": cv2.resize(astronaut, (w * 4, h * 4), interpolation=cv2.INTER_CUBIC),
    }


@pytest.fixture(scope="module")
def dlib_faces(astronaut_rgb, dlib_models):
    """Per variant: image, dlib's 5 points, 68 points, dlib's chip and dlib's descriptor."""
    faces = {}
    for name, image in _variants(astronaut_rgb).items():
        detections = dlib_models["detector"](image, 1)
        assert len(detections) >= 1, f"dlib finds no face in variant {name}"
        box = max(detections, key=lambda r: r.area())
        shape5 = dlib_models["shape5"](image, box)
        shape68 = dlib_models["shape68"](image, box)
        chip = np.asarray(dlib.get_face_chip(image, shape5, 150, 0.25))
        faces[name] = {
            "image": image,
            "points5": np.array([[p.x, p.y] for p in shape5.parts()], dtype=np.float64),
            "points68": np.array([[p.x, p.y] for p in shape68.parts()], dtype=np.float64),
            "chip": chip,
            "descriptor": np.array(dlib_models["resnet"].compute_face_descriptor(chip)),
        }
    return faces


def mtcnn_like_points(points68: np.ndarray) -> np.ndarray:
    """MTCNN's five points from dlib's 68: eye centres, nose tip, mouth corners."""
    return np.stack(
        [
            points68[36:42].mean(axis=0),
            points68[42:48].mean(axis=0),
            points68[30],
            points68[48],
            points68[54],
        ]
    )


# ------------------------------------------------------------------------------------------
# Network parity with dlib
# ------------------------------------------------------------------------------------------


def test_network_matches_dlib_on_dlib_chips(dlib_faces, embedder):
    chips = np.stack([face["chip"] for face in dlib_faces.values()])
    reference = np.stack([face["descriptor"] for face in dlib_faces.values()])
    ours = embedder.raw_descriptors(chips)
    assert ours.shape == (len(chips), 128) and ours.dtype == np.float32
    worst = np.abs(ours - reference).max(axis=1)
    assert worst.max() < 1e-4, dict(zip(dlib_faces, worst))
    # The variants are the same person: dlib's own rule (Euclidean < 0.6) holds between them.
    assert np.linalg.norm(reference - reference[0], axis=1).max() < 0.6


def test_network_matches_dlib_on_second_detection_and_batch_sizes(astronaut_rgb, dlib_models):
    """Every detection dlib makes (not only the largest), through batch sizes 1 and 3."""
    detections = dlib_models["detector"](astronaut_rgb, 1)
    chips = np.stack(
        [np.asarray(dlib.get_face_chip(astronaut_rgb, dlib_models["shape5"](astronaut_rgb, d), 150, 0.25)) for d in detections]
    )
    reference = np.stack([np.array(dlib_models["resnet"].compute_face_descriptor(c)) for c in chips])
    for batch_size in (1, 3):
        ours = FaceEmbedder(batch_size=batch_size).raw_descriptors(np.concatenate([chips, chips]))
        assert np.abs(ours - np.concatenate([reference, reference])).max() < 1e-4


def test_zero_pad_add_keeps_conv_output_top_left():
    conv_out = torch.ones(1, 4, 1, 1)
    shortcut = torch.full((1, 2, 2, 2), 10.0)
    result = zero_pad_add(conv_out, shortcut)
    assert result.shape == (1, 4, 2, 2)
    assert result[0, 0, 0, 0] == 11 and result[0, 0, 1, 1] == 10
    assert result[0, 3, 0, 0] == 1 and result[0, 3, 1, 1] == 0


# ------------------------------------------------------------------------------------------
# Alignment against dlib's chips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["original", "mirror", "rotated_15", "half", "gray"])
def test_alignment_reproduces_dlib_chip(dlib_faces, name):
    face = dlib_faces[name]
    ours = align_faces([face["image"]], [0], face["points5"][None], template=DLIB_SHAPE5_TEMPLATE).numpy()[0]
    difference = np.abs(ours.astype(np.int32) - face["chip"].astype(np.int32))
    assert difference.max() <= 1 and difference.mean() < 0.05


@pytest.mark.parametrize("name", ["x2_5", "x4"])
def test_alignment_of_big_faces_uses_the_pyramid_like_dlib(dlib_faces, embedder, name):
    face = dlib_faces[name]
    points = face["points5"][None]
    with_pyramid = align_faces([face["image"]], [0], points, template=DLIB_SHAPE5_TEMPLATE).numpy()
    without = align_faces([face["image"]], [0], points, template=DLIB_SHAPE5_TEMPLATE, antialias=False).numpy()
    error_with = np.abs(with_pyramid[0].astype(np.int32) - face["chip"]).mean()
    error_without = np.abs(without[0].astype(np.int32) - face["chip"]).mean()
    # dlib builds its pyramid from a crop whose parity can shift the filter grid by a pixel.
    assert error_with < 0.6 and error_with < error_without / 3
    distance = np.linalg.norm(embedder.raw_descriptors(with_pyramid)[0] - face["descriptor"])
    assert distance < 0.03


def test_mtcnn_points_give_descriptors_close_to_dlibs(dlib_faces, embedder):
    """The production path: MTCNN-style points (here from dlib's 68-point model) + template."""
    names = list(dlib_faces)
    images = [dlib_faces[n]["image"] for n in names]
    points = np.stack([mtcnn_like_points(dlib_faces[n]["points68"]) for n in names])
    raw = embedder.raw_descriptors(embedder.align(images, np.arange(len(names)), points))
    reference = np.stack([dlib_faces[n]["descriptor"] for n in names])
    distances = np.linalg.norm(raw - reference, axis=1)
    assert np.median(distances) < 0.2 and distances.max() < 0.35, dict(zip(names, distances.round(3)))


# ------------------------------------------------------------------------------------------
# Alignment geometry
# ------------------------------------------------------------------------------------------


def _random_similarities(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 4.0, count)
    angle = rng.uniform(-np.pi, np.pi, count)
    shift = rng.uniform(-500, 500, (count, 2))
    linear = scale[:, None, None] * np.stack(
        [np.stack([np.cos(angle), -np.sin(angle)], 1), np.stack([np.sin(angle), np.cos(angle)], 1)], 1
    )
    return linear, shift


def test_similarity_fit_recovers_a_known_transform():
    linear, shift = _random_similarities(50, seed=1)
    source = np.random.default_rng(2).uniform(0, 300, (50, 5, 2))
    target = np.einsum("nij,nkj->nki", linear, source) + shift[:, None, :]
    fitted = similarity_transforms(torch.tensor(source), torch.tensor(target)).numpy()
    np.testing.assert_allclose(fitted[:, :, :2], linear, atol=1e-9)
    np.testing.assert_allclose(fitted[:, :, 2], shift, atol=1e-7)


def test_chip_to_source_sends_template_onto_landmarks():
    """Exactly dlib's chip_details convention: the fitted similarity, with chip pixel 74.5 on the
    image of (75, 75) and scale (150 s - 1) / 149; so template points land within a pixel."""
    linear, shift = _random_similarities(20, seed=3)  # chip -> image, scale s
    landmarks = np.einsum("nij,kj->nki", linear, MTCNN_TEMPLATE) + shift[:, None, :]
    maps = chip_to_source_transforms(torch.tensor(landmarks), MTCNN_TEMPLATE).numpy()
    scale = np.sqrt(np.abs(np.linalg.det(linear)))
    expected_linear = linear * ((150 * scale - 1) / (149 * scale))[:, None, None]
    centre = np.einsum("nij,j->ni", linear, [75.0, 75.0]) + shift
    expected_shift = centre - np.einsum("nij,j->ni", expected_linear, [74.5, 74.5])
    np.testing.assert_allclose(maps[:, :, :2], expected_linear, atol=1e-9)
    np.testing.assert_allclose(maps[:, :, 2], expected_shift, atol=1e-7)
    mapped = np.einsum("nij,kj->nki", maps[:, :, :2], MTCNN_TEMPLATE) + maps[:, None, :, 2]
    assert (np.linalg.norm(mapped - landmarks, axis=2) / scale[:, None]).max() < 1.0


def test_warp_puts_marked_landmarks_on_the_template():
    """Paint five dots on a black image at rotated/scaled landmark positions; after alignment
    each dot's centroid lands on its template point."""
    rng = np.random.default_rng(4)
    images, points = [], []
    for angle_degrees, scale in ((0, 1.0), (25, 2.7), (-40, 0.6), (180, 1.5)):
        angle = np.deg2rad(angle_degrees)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = (MTCNN_TEMPLATE - 75) @ rotation.T + rng.uniform(250, 350, 2)
        canvas = np.zeros((640, 600, 3), np.uint8)
        for (x, y) in landmarks:
            cv2.circle(canvas, (int(round(x * 16)), int(round(y * 16))), int(4 * scale * 16), (255, 255, 255), -1, cv2.LINE_AA, shift=4)
        images.append(canvas)
        points.append(landmarks)
    points = np.stack(points)
    chips = align_faces(images, np.arange(4), points).numpy()
    maps = chip_to_source_transforms(torch.tensor(points), MTCNN_TEMPLATE).numpy()
    for chip, chip_to_image, landmarks in zip(chips, maps, points):
        # Where the transform says each landmark is in the chip (dlib's convention puts it
        # within a pixel of the template; the previous test pins that down exactly).
        expected = np.linalg.solve(chip_to_image[:, :2], (landmarks - chip_to_image[:, 2]).T).T
        intensity = chip[:, :, 0].astype(np.float64)
        for target, where in zip(MTCNN_TEMPLATE, expected):
            x0, y0 = (target - 12).astype(int)
            window = intensity[y0 : y0 + 25, x0 : x0 + 25]
            ys, xs = np.mgrid[y0 : y0 + 25, x0 : x0 + 25]
            centroid = np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()
            # From pyramid level 1 on, dlib's point_down (p/2 - (1.25, 0.75)) is a quarter
            # level-1 pixel off the filter's centre (p/2 - 1); kept for dlib parity.
            tolerance = 0.15 if abs(np.linalg.det(chip_to_image[:, :2])) < 4 else 0.35
            assert np.linalg.norm(centroid - where) < tolerance, (centroid, where)
            assert np.linalg.norm(centroid - target) < 0.9 + tolerance, (centroid, target)


def test_batched_alignment_equals_one_face_at_a_time(dlib_faces):
    """Faces from images of different sizes (pyramid levels 0-1), in mixed order, several per
    image (so crops and pyramids are shared), some images without faces, one face partly
    outside its image: each chip is the same as when aligned alone."""
    names = ["original", "x4", "half", "mirror", "x2_5", "gray"]
    images = [dlib_faces[n]["image"] for n in names]
    image_index, landmarks = [], []
    for order, i in enumerate([1, 0, 4, 2, 0, 3, 1, 4, 1]):
        points = mtcnn_like_points(dlib_faces[names[i]]["points68"])
        if order == 4:  # shifted so the chip leaves the image at the top-left
            points = points - points.min(axis=0) + 5
        if order == 8:  # a second big face elsewhere in the 4x photo widens its crop
            points = points + [333.0, 517.0]
        image_index.append(i)
        landmarks.append(points + order * 0.37)  # distinct sub-pixel positions
    image_index = np.array(image_index)
    landmarks = np.stack(landmarks)
    batched = align_faces(images, image_index, landmarks).numpy()
    singles = np.stack([align_faces([images[i]], [0], p[None]).numpy()[0] for i, p in zip(image_index, landmarks)])
    np.testing.assert_array_equal(batched, singles)
    assert (batched[4] == 0).all(axis=-1).mean() > 0.05  # black outside the image, as in dlib


def test_alignment_outside_image_is_black_like_dlib(dlib_faces):
    face = dlib_faces["original"]
    crop_left = int(face["points5"][:, 0].min()) - 10  # cut through the face
    image = np.ascontiguousarray(face["image"][:, crop_left:])
    points = face["points5"] - [crop_left, 0]
    shape = dlib.full_object_detection(
        dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1),
        [dlib.point(int(x), int(y)) for x, y in points],
    )
    reference = np.asarray(dlib.get_face_chip(image, shape, 150, 0.25))
    ours = align_faces([image], [0], points[None], template=DLIB_SHAPE5_TEMPLATE).numpy()[0]
    assert (reference == 0).all(axis=-1).mean() > 0.1
    assert np.abs(ours.astype(np.int32) - reference).max() <= 1


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def test_embed_is_normalised_and_consistent(dlib_faces, embedder):
    names = ["original", "mirror", "brighter"]
    images = [dlib_faces[n]["image"] for n in names]
    points = np.stack([mtcnn_like_points(dlib_faces[n]["points68"]) for n in names]).astype(np.float32)
    vectors = embedder.embed(images, np.arange(3), points)
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    chips = embedder.align(images, np.arange(3), points)
    assert chips.dtype == torch.uint8 and tuple(chips.shape) == (3, 150, 150, 3)
    # Flip averaging: the chip's and its mirror image's raw descriptors, summed, then normalised.
    summed = embedder.raw_descriptors(chips) + embedder.raw_descriptors(chips.flip(2))
    np.testing.assert_allclose(vectors, summed / np.linalg.norm(summed, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(embedder.embed_chips(chips.numpy()), vectors, atol=1e-6)
    plain = FaceEmbedder(device="cpu", flip_average=False).embed_chips(chips)
    raw = embedder.raw_descriptors(chips)
    np.testing.assert_allclose(plain, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    # Same person under the documented threshold.
    assert (vectors @ vectors.T).min() >= embedder.threshold


def test_no_faces(embedder, astronaut_rgb):
    empty = np.zeros((0, 5, 2), np.float32)
    vectors = embedder.embed([astronaut_rgb], np.zeros(0, np.int64), empty)
    assert vectors.shape == (0, EMBEDDING_DIM) and vectors.dtype == np.float32
    assert embedder.embed([], np.zeros(0, np.int64), empty).shape == (0, EMBEDDING_DIM)
    assert tuple(embedder.align([], [], empty).shape) == (0, 150, 150, 3)
    assert embedder.embed_chips(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, EMBEDDING_DIM)


def test_bad_inputs_are_refused(embedder, astronaut_rgb):
    points = np.full((1, 5, 2), 100.0)
    points[0, :, 0] += np.arange(5) * 10
    with pytest.raises(ValueError, match="uint8 RGB"):
        embedder.align([astronaut_rgb.astype(np.float32)], [0], points)
    with pytest.raises(ValueError, match="out of range"):
        embedder.align([astronaut_rgb], [1], points)
    with pytest.raises(ValueError, match="landmarks"):
        embedder.align([astronaut_rgb], [0], points[:, :4])
    with pytest.raises(ValueError, match="2 entries for 1 faces"):
        embedder.align([astronaut_rgb], [0, 0], points)
    with pytest.raises(ValueError, match="NaN"):
        embedder.align([astronaut_rgb], [0], np.full((1, 5, 2), np.nan))
    with pytest.raises(ValueError, match="chips"):
        embedder.embed_chips(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="precision"):
        FaceEmbedder(precision="int8")


def test_identity_metadata(embedder):
    assert embedder.weights_sha256 == hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert 0.8 < embedder.threshold < 1.0
    assert FaceEmbedder(device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            FaceEmbedder(device="cuda:0")


# ------------------------------------------------------------------------------------------
# The .dat reader
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return default_model_path().read_bytes()


def test_reader_finds_every_parameter():
    weights = read_dlib_resnet()
    assert weights.parameter_count == EXPECTED_PARAMETER_COUNT == 5_614_592
    assert weights.distance_threshold == pytest.approx(0.6)
    assert weights.margin == pytest.approx(0.04)
    assert weights.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert weights.input_size == (150, 150)


@pytest.mark.parametrize("keep", [100, 300, 5_000_000, -1])
def test_reader_refuses_truncated_file(model_bytes, keep):
    with pytest.raises(DlibModelFormatError, match=r"truncated.*at byte offset \d+"):
        parse_dlib_resnet(model_bytes[:keep])


def test_reader_refuses_trailing_bytes(model_bytes):
    with pytest.raises(DlibModelFormatError, match=r"3 trailing bytes.*offset 22466066"):
        parse_dlib_resnet(model_bytes + b"\x01\x02\x03")


def test_reader_refuses_other_content(model_bytes):
    with pytest.raises(DlibModelFormatError, match="loss_metric_2"):
        parse_dlib_resnet(model_bytes.replace(b"loss_metric_2", b"loss_metric_3", 1))
    with pytest.raises(DlibModelFormatError, match="unknown layer type 'relv_'"):
        parse_dlib_resnet(model_bytes.replace(b"relu_", b"relv_", 1))
    with pytest.raises(DlibModelFormatError, match="byte offset 0"):
        parse_dlib_resnet(b"\x7f" + model_bytes[1:])
