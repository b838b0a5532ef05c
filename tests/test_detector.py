"""Self-contained tests of the batched MTCNN detector (no ../shared data needed).

Real faces come from scikit-image's public-domain astronaut photo: its face is pasted at
known positions, scales and rotations into synthetic scenes, and the detections are checked
against the transformed box of the face.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import torch

from facebatch.detector import (
    DEFAULT_MAX_PIXELS,
    Detections,
    MTCNNDetector,
    PNet,
    _batched_nms,
    _FastPNet,
    load_mtcnn_weights,
    mtcnn_weight_paths,
)

# Face box of the astronaut as facenet-pytorch 2.5.3's MTCNN finds it (x1, y1, x2, y2).
ASTRONAUT_FACE = np.array([181.05, 62.16, 267.75, 172.05])
# The patch pasted into scenes: the face with some margin.
PATCH = (130, 10, 320, 225)  # x1, y1, x2, y2 in the astronaut image


@pytest.fixture(scope="module")
def detector():
    return MTCNNDetector(device="cpu")


@pytest.fixture(scope="module")
def face_patch(astronaut_rgb):
    x1, y1, x2, y2 = PATCH
    return np.ascontiguousarray(astronaut_rgb[y1:y2, x1:x2])


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def noise_scene(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def gradient_scene(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def paste_face(scene, patch, center, scale, angle_deg):
    """Paste the face patch scaled by `scale`, rotated by `angle_deg` (counter-clockwise,
    OpenCV convention) with its face centre at `center`. Returns the expected face box."""
    ph, pw = patch.shape[:2]
    face_c = np.array(
        [(ASTRONAUT_FACE[0] + ASTRONAUT_FACE[2]) / 2 - PATCH[0], (ASTRONAUT_FACE[1] + ASTRONAUT_FACE[3]) / 2 - PATCH[1]]
    )
    m = cv2.getRotationMatrix2D((float(face_c[0]), float(face_c[1])), angle_deg, scale)
    m[:, 2] += np.asarray(center, np.float64) - face_c  # move the face centre to `center`
    h, w = scene.shape[:2]
    warped = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((ph, pw), 255, np.uint8), m, (w, h), flags=cv2.INTER_NEAREST)
    scene[mask > 0] = warped[mask > 0]
    fw = (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0]) * scale
    fh = (ASTRONAUT_FACE[3] - ASTRONAUT_FACE[1]) * scale
    return np.array([center[0] - fw / 2, center[1] - fh / 2, center[0] + fw / 2, center[1] + fh / 2])


def build_scenes(face_patch):
    """Scenes of different sizes and backgrounds with faces at known places."""
    specs = [
        # (size, background, [(centre, scale, angle)])
        ((480, 640), noise_scene, [((200, 180), 1.0, 0), ((480, 330), 0.5, 0)]),
        ((300, 900), gradient_scene, [((150, 150), 0.9, 12), ((700, 140), 0.35, 0)]),
        ((1024, 768), gradient_scene, [((400, 520), 2.5, -10)]),
        ((257, 333), noise_scene, [((160, 130), 0.8, 0)]),
    ]
    images, expected = [], []
    for k, ((h, w), background, faces) in enumerate(specs):
        scene = background(h, w, seed=k)
        boxes = [paste_face(scene, face_patch, c, s, a) for c, s, a in faces]
        images.append(scene)
        expected.append(boxes)
    return images, expected


def assert_found(result: Detections, expected_boxes, min_iou):
    for box in expected_boxes:
        best = max((iou(box, b) for b in result.boxes), default=0.0)
        assert best >= min_iou, f"expected face {box.round(1)} not found (best IoU {best:.2f}) in {result.boxes.round(1)}"


# ---- weights ---------------------------------------------------------------------------


def test_weights_sha256_and_shapes(detector):
    paths = mtcnn_weight_paths()
    for name, path in paths.items():
        assert detector.weights_sha256[name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert detector.params["weights_sha256"] == detector.weights_sha256
    nets = load_mtcnn_weights()
    shapes = {
        "pnet": {"conv1.weight": (10, 3, 3, 3), "prelu1.weight": (10,), "conv4_1.weight": (2, 32, 1, 1), "conv4_2.weight": (4, 32, 1, 1)},
        "rnet": {"conv3.weight": (64, 48, 2, 2), "dense4.weight": (128, 576), "dense5_1.weight": (2, 128), "dense5_2.weight": (4, 128)},
        "onet": {"conv4.weight": (128, 64, 2, 2), "dense5.weight": (256, 1152), "dense6_1.weight": (2, 256), "dense6_3.weight": (10, 256)},
    }
    for name, expected in shapes.items():
        params = dict(nets[name].named_parameters())
        for pname, shape in expected.items():
            assert tuple(params[pname].shape) == shape, (name, pname)


def test_weight_layout_matches_keras_arrays():
    import joblib

    nets = load_mtcnn_weights()
    arrays = joblib.load(mtcnn_weight_paths()["onet"])
    conv1 = nets["onet"].conv1.weight.detach().numpy()
    # Keras (kh, kw, in, out) -> torch (out, in, kh, kw)
    assert np.array_equal(conv1, arrays[0].transpose(3, 2, 0, 1))
    assert np.array_equal(nets["onet"].prelu1.weight.detach().numpy(), arrays[2].reshape(-1))
    assert np.array_equal(nets["onet"].dense5.weight.detach().numpy(), arrays[12].T)
    # mtcnn orders the heads box (4), landmarks (10), face (2).
    assert np.array_equal(nets["onet"].dense6_2.weight.detach().numpy(), arrays[15].T)
    assert np.array_equal(nets["onet"].dense6_3.weight.detach().numpy(), arrays[17].T)
    assert np.array_equal(nets["onet"].dense6_1.weight.detach().numpy(), arrays[19].T)


def test_astronaut_face_and_landmarks(detector, astronaut_rgb):
    (res,) = detector.detect([astronaut_rgb])
    assert len(res) == 1
    assert iou(res.boxes[0], ASTRONAUT_FACE) > 0.98
    assert res.scores[0] > 0.99
    left_eye, right_eye, nose, mouth_l, mouth_r = res.landmarks[0]
    assert left_eye[0] < nose[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert res.boxes.dtype == np.float32 and res.scores.dtype == np.float32 and res.landmarks.dtype == np.float32


# ---- detection in synthetic scenes ----------------------------------------------------------


def test_pasted_faces_found_in_mixed_size_batch(detector, face_patch):
    images, expected = build_scenes(face_patch)
    results = detector.detect(images)
    assert len(results) == len(images)
    for res, boxes in zip(results, expected):
        assert_found(res, boxes, min_iou=0.6)
        # No confident detection away from the pasted faces.
        for box, score in zip(res.boxes, res.scores):
            if score >= 0.9:
                assert max(iou(box, e) for e in boxes) > 0.3, f"unexpected face at {box} ({score:.3f})"
        assert np.all(np.diff(res.scores) <= 0), "not sorted by score"


def test_scaled_faces_have_tight_boxes(detector, face_patch):
    scene = gradient_scene(600, 800, seed=7)
    expected = [paste_face(scene, face_patch, (200, 250), 1.3, 0), paste_face(scene, face_patch, (600, 300), 0.6, 0)]
    (res,) = detector.detect([scene])
    assert_found(res, expected, min_iou=0.75)


def test_no_face_scenes_give_no_faces(detector):
    scenes = [
        noise_scene(400, 500, seed=11),
        gradient_scene(333, 777, seed=12),
        np.full((300, 300, 3), 128, np.uint8),
    ]
    for res in detector.detect(scenes):
        assert len(res) == 0
        assert res.boxes.shape == (0, 4) and res.scores.shape == (0,) and res.landmarks.shape == (0, 5, 2)


def test_batch_equals_single_images(detector, face_patch):
    images, _ = build_scenes(face_patch)
    batched = detector.detect(images)
    for image, res in zip(images, batched):
        (single,) = detector.detect([image])
        assert len(single) == len(res)
        np.testing.assert_allclose(single.boxes, res.boxes, atol=1e-2)
        np.testing.assert_allclose(single.scores, res.scores, atol=1e-4)
        np.testing.assert_allclose(single.landmarks, res.landmarks, atol=1e-2)


def test_tiling_and_packing_do_not_change_results(face_patch):
    """Tiny canvases force every level to be split into overlapping pieces; the packed,
    tiled P-Net must give the same detections as large canvases."""
    images, _ = build_scenes(face_patch)
    big = MTCNNDetector(canvas_size=(2048, 2048)).detect(images)
    tiny = MTCNNDetector(canvas_size=(96, 128)).detect(images)
    for a, b in zip(big, tiny):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_fused_pnet_equals_plain_pnet():
    nets = load_mtcnn_weights()
    plain, fused = nets["pnet"], _FastPNet(nets["pnet"])
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 90)
    with torch.inference_mode():
        reg, prob = plain(x)
        head = fused(x.contiguous(memory_format=torch.channels_last))  # (N, h, w, 6)
    torch.testing.assert_close(torch.softmax(head[..., :2], -1)[..., 1], prob[:, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head[..., 2:].permute(0, 3, 1, 2), reg, atol=1e-5, rtol=1e-4)


def test_fused_pnet_partial_pool_window_fix():
    """An odd-sized level inside a bigger canvas: the fix for the ceil-mode pool window that
    hangs over its edge must reproduce the plain P-Net on the level alone."""
    nets = load_mtcnn_weights()
    plain, fused = nets["pnet"], _FastPNet(nets["pnet"])
    torch.manual_seed(1)
    h, w = 31, 45  # odd both ways
    level = torch.randn(1, 3, h, w)
    canvas = torch.randn(1, 3, 40, 60) * 3  # garbage around the level
    canvas[:, :, :h, :w] = level
    hp, wp = 40 // 2 - 1, 60 // 2 - 1
    n_r, n_c = (h - 1) // 2, (w - 1) // 2
    fix_rows = torch.as_tensor((n_r - 1) * wp + np.arange(n_c))
    fix_cols = torch.as_tensor(np.arange(n_r) * wp + n_c - 1)
    with torch.inference_mode():
        _, prob = plain(level)
        head = fused(canvas.contiguous(memory_format=torch.channels_last), fix_rows, fix_cols)
    fprob = torch.softmax(head[..., :2], -1)[..., 1]
    oh, ow = prob.shape[2:]
    torch.testing.assert_close(fprob[0, :oh, :ow], prob[0, 1], atol=1e-5, rtol=1e-4)


# ---- NMS ----------------------------------------------------------------------------


def _sequential_nms(boxes, scores, groups, threshold, mode):
    keep = []
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        suppressed = np.zeros(len(idx), bool)
        for a in range(len(idx)):
            if suppressed[a]:
                continue
            keep.append(idx[a])
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                extra = 1.0 if mode == "min" else 0.0
                iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]) + extra)
                ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]) + extra)
                area = lambda k: (boxes[k, 2] - boxes[k, 0] + extra) * (boxes[k, 3] - boxes[k, 1] + extra)
                inter = iw * ih
                ov = inter / min(area(i), area(j)) if mode == "min" else inter / (area(i) + area(j) - inter)
                if ov > threshold:
                    suppressed[b] = True
    return sorted(keep)


@pytest.mark.parametrize("mode,threshold", [("union", 0.5), ("union", 0.7), ("min", 0.7)])
def test_batched_nms_matches_sequential_greedy(mode, threshold):
    rng = np.random.default_rng(3)
    n = 400
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(10, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    groups = rng.integers(0, 3, n)
    got = _batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), threshold, mode)
    assert sorted(got.tolist()) == _sequential_nms(boxes, scores, groups, threshold, mode)


# ---- input handling -------------------------------------------------------------------


def test_empty_batch(detector):
    assert detector.detect([]) == []


def test_tiny_images_give_empty_detections(detector, face_patch):
    tiny = [np.zeros((8, 8, 3), np.uint8), np.full((11, 300, 3), 200, np.uint8), np.zeros((1, 1, 3), np.uint8)]
    results = detector.detect(tiny + [face_patch])
    assert [len(r) for r in results[:3]] == [0, 0, 0]
    assert len(results[3]) == 1  # the normal image in the same batch is unaffected


def test_grayscale_and_rgba_are_converted(detector, astronaut_rgb):
    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    gray_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.dstack([astronaut_rgb, np.full(astronaut_rgb.shape[:2], 7, np.uint8)])
    r_gray, r_gray1, r_gray_rgb, r_rgba, r_rgb = detector.detect(
        [gray, gray[:, :, None], gray_rgb, rgba, astronaut_rgb]
    )
    np.testing.assert_array_equal(r_gray.boxes, r_gray_rgb.boxes)
    np.testing.assert_array_equal(r_gray1.boxes, r_gray_rgb.boxes)
    np.testing.assert_array_equal(r_rgba.boxes, r_rgb.boxes)
    assert len(r_gray) == 1


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (np.zeros((50, 50, 3), np.float32), TypeError, "uint8"),
        (np.zeros((50, 50, 3), np.uint16), TypeError, "uint16"),
        (np.zeros((50, 50, 2), np.uint8), ValueError, "channels"),
        (np.zeros((2, 50, 50, 3), np.uint8), ValueError, "shape"),
        ([[1, 2], [3, 4]], TypeError, "numpy array"),
    ],
)
def test_bad_inputs_raise_clear_errors(detector, bad, error, match):
    with pytest.raises(error, match=match):
        detector.detect([np.zeros((30, 30, 3), np.uint8), bad])


def test_single_array_instead_of_list_is_rejected(detector):
    with pytest.raises(TypeError, match="list"):
        detector.detect(np.zeros((30, 30, 3), np.uint8))


def test_max_pixels_downscales_and_maps_back(face_patch):
    scene = gradient_scene(1500, 2000, seed=5)
    expected = [paste_face(scene, face_patch, (1200, 700), 3.0, 0)]
    full = MTCNNDetector(max_pixels=None).detect([scene])[0]
    capped = MTCNNDetector(max_pixels=500_000).detect([scene])[0]
    assert_found(full, expected, min_iou=0.7)
    assert_found(capped, expected, min_iou=0.7)  # boxes are in the original's pixels
    assert DEFAULT_MAX_PIXELS >= 13_000_000  # full resolution for the corpus' largest photo


def test_constructor_validation():
    with pytest.raises(ValueError):
        MTCNNDetector(min_face_size=0)
    with pytest.raises(ValueError):
        MTCNNDetector(scale_factor=1.2)
    with pytest.raises(ValueError):
        MTCNNDetector(thresholds=(0.6, 0.7))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            MTCNNDetector(device="cuda")
    assert MTCNNDetector(device="auto").device.type in ("cpu", "cuda")


def test_params_describe_results(detector):
    p = detector.params
    assert p["min_face_size"] == 20 and p["thresholds"] == [0.6, 0.7, 0.7] and p["scale_factor"] == 0.709
    assert p["max_pixels"] == DEFAULT_MAX_PIXELS
    assert set(p["weights_sha256"]) == {"pnet", "rnet", "onet"}


def test_integral_wraps_exactly_like_cv2():
    """Sums past 2**31 wrap in int32; rectangle sums stay exact (CPU: cv2, GPU: torch)."""
    from facebatch.detector import _IntegralImages, _integrate, _Workspace

    white = np.full((3000, 3000, 3), 255, np.uint8)  # total 2.3e9 > 2**31
    integral = _IntegralImages([white], torch.device("cpu"), _Workspace())
    view = integral.image_view(0)
    torched = torch.empty_like(view)
    _integrate(torch.from_numpy(white), torched)
    assert torch.equal(torched, view)
    rect = view[2900, 2950] - view[100, 2950] - view[2900, 40] + view[100, 40]
    assert int(rect[0]) == 255 * 2800 * 2910


def test_host_area_kernels_equal_the_torch_expressions_bit_for_bit():
    """The CPU's compiled samplers (facebatch.area_kernels) write the same float32 bits as
    the torch expressions the device path runs (forced on the CPU here): pyramid pieces at
    offsets inside a canvas, R-/O-Net crops, on random photos-like noise and on a white image
    whose integral wraps past 2**31."""
    from facebatch.detector import _bins, _bins_np, _GridBins, _IntegralImages, _Workspace

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((97, 130), (480, 361), (64, 64))]
    images.append(np.full((3000, 3000, 3), 255, np.uint8))
    cpu = torch.device("cpu")
    host = _IntegralImages(images, cpu, _Workspace())
    device_path = _IntegralImages(images, cpu, _Workspace(), on_device=True)
    assert not host.on_device and device_path.on_device
    assert torch.equal(host.flat, device_path.flat)

    for i, im in enumerate(images):
        h, w = im.shape[:2]
        for scale in (0.6, 0.6 * 0.709**3, 0.05):
            lh, lw = int(h * scale + 1), int(w * scale + 1)
            rs, re = _bins_np(h, lh)
            cs, ce = _bins_np(w, lw)
            # A piece: rows / columns from an offset into the level, as the canvas tiling cuts them.
            r0, c0 = lh // 3, lw // 4
            rs, re, cs, ce = rs[r0:], re[r0:], cs[c0:], ce[c0:]
            kh, kw = (re - rs).astype(np.float32), (ce - cs).astype(np.float32)
            c_lo, c_hi = int(cs[0]), int(ce[-1]) + 1
            bins = _GridBins(len(rs), len(cs), c_lo, c_hi, torch.from_numpy(rs), torch.from_numpy(re),
                             torch.from_numpy(np.concatenate([cs, ce]) - c_lo), torch.from_numpy(kh),
                             torch.from_numpy(kw))
            canvas_h, canvas_w, y, x = len(rs) + 5, len(cs) + 7, 3, 4
            expected = torch.full((2, canvas_h, canvas_w, 3), 9.0)
            device_path.sample_grid(i, bins, expected[1, y : y + len(rs), x : x + len(cs)], chunk_elems=1 << 12)
            got = torch.full((2, canvas_h, canvas_w, 3), 9.0)
            host.sample_grid_host(i, (rs, re, cs, ce, kh, kw), got, (canvas_h * canvas_w + y * canvas_w + x) * 3,
                                  canvas_w * 3)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (i, scale)

    n = 300
    ids = torch.from_numpy(rng.integers(0, len(images), n))
    heights = torch.tensor([im.shape[0] for im in images])[ids]
    widths = torch.tensor([im.shape[1] for im in images])[ids]
    y0 = (torch.from_numpy(rng.random(n)) * heights * 0.5).long()
    x0 = (torch.from_numpy(rng.random(n)) * widths * 0.5).long()
    side = torch.minimum(torch.from_numpy(rng.integers(1, 3000, n)), torch.minimum(heights - y0, widths - x0))
    for size in (24, 48):
        rs, re = _bins(y0, side, size, cpu)
        cs, ce = _bins(x0, side, size, cpu)
        expected = device_path.sample_boxes(ids, rs, re, cs, ce)
        got = host.sample_boxes(ids, rs, re, cs, ce)
        assert got.shape == expected.shape == (n, size, size, 3)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_area_kernels_compile_where_no_cache_directory_can_be_written():
    """A read-only install without a writable HOME or NUMBA_CACHE_DIR leaves numba no cache
    locator (simulated with NUMBA_CACHE_LOCATOR_CLASSES naming one that never applies): the
    detector still imports and runs, compiling its loops in the process."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from facebatch.detector import MTCNNDetector\n"
        "rng = np.random.default_rng(0)\n"
        "detector, image = MTCNNDetector(), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)\n"
        "found = detector.detect([image]) + detector.detect([image])  # the second call compiles\n"
        "import facebatch.area_kernels as k\n"
        "print(len(found), k.area_grid._cache.__class__.__name__, len(k.area_boxes.signatures))\n"
    )
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="ZipCacheLocator")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    count, cache_kind, box_signatures = result.stdout.split()
    assert cache_kind == "NullCache" and int(box_signatures) == 1


def test_the_torch_samplers_buffers_are_freed_once_the_compiled_loops_take_over(astronaut_rgb):
    from facebatch.detector import _TORCH_SAMPLER_BUFFERS

    detector = MTCNNDetector()
    detector.detect([astronaut_rgb])
    kept = set(detector._workspace._buffers)
    assert set(_TORCH_SAMPLER_BUFFERS) <= kept  # the first call sampled with torch
    detector.detect([astronaut_rgb])
    assert not set(_TORCH_SAMPLER_BUFFERS) & set(detector._workspace._buffers)
    assert {"integral", "canvas"} <= set(detector._workspace._buffers)  # the rest stays for later calls


def test_the_first_call_samples_with_torch_and_later_ones_compiled_with_the_same_results():
    """A detector's first detect() call spares numba's set-up (about a CPU-second) and samples with
    the torch expressions; later calls use the compiled loops. The detections are the same bits."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from skimage import data\n"
        "from facebatch.detector import MTCNNDetector\n"
        "image = data.astronaut()\n"
        "detector = MTCNNDetector()\n"
        "first = detector.detect([image, image[::2, ::2]])\n"
        "print('numba' in sys.modules)\n"
        "second = detector.detect([image, image[::2, ::2]])\n"
        "print('numba' in sys.modules)\n"
        "same = all(np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)\n"
        "           and np.array_equal(a.landmarks, b.landmarks) for a, b in zip(first, second))\n"
        "print(same, sum(len(d) for d in first))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    numba_after_first, numba_after_second, same, faces = result.stdout.split()
    assert (numba_after_first, numba_after_second) == ("False", "True")
    assert same == "True" and int(faces) >= 2
