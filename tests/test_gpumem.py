"""Memory budgets, out-of-memory halving and device-error handling, on the CPU.

The GPU's planning (all canvases / crops in as few calls as the budget allows) is forced on a
CPU detector, so the CUDA-only branch runs here: a small budget must give the same faces in
more calls, an injected out-of-memory error must be retried with half the call, and the
memory model's figures must stay above what the stages measurably allocate.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from facebatch import gpumem
from facebatch.detector import (
    ONET_BYTES_PER_CROP,
    PNET_BYTES_PER_PIXEL,
    RNET_BYTES_PER_CROP,
    MTCNNDetector,
)
from test_detector import build_scenes

CANVAS = (256, 256)


@pytest.fixture(scope="module")
def scenes(astronaut_rgb):
    x1, y1, x2, y2 = 130, 10, 320, 225
    patch = np.ascontiguousarray(astronaut_rgb[y1:y2, x1:x2])
    images, _ = build_scenes(patch)
    return [astronaut_rgb] + images


def gpu_planned(**kwargs) -> MTCNNDetector:
    det = MTCNNDetector(device="cpu", canvas_size=CANVAS, **kwargs)
    det._gpu_planning = True  # the CUDA branch: as few calls as the budget allows
    return det


def assert_same(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


@pytest.fixture(scope="module")
def reference(scenes):
    """The CPU path's results (one small canvas per call, cache-sized crop chunks)."""
    det = MTCNNDetector(device="cpu", canvas_size=CANVAS)
    results = det.detect(scenes)
    assert sum(len(r) for r in results) >= 6
    return results


# --------------------------------------------------------------------------- helpers


def test_actors_sharing_a_gpu_split_its_budget():
    # A 24 GiB card shared by 3 actors: each plans its calls for a third of the default share.
    assert gpumem.shared_budget(24 << 30, 1) == int((24 << 30) * gpumem.DEFAULT_FRACTION)
    assert gpumem.shared_budget(24 << 30, 3) == int((24 << 30) * gpumem.DEFAULT_FRACTION / 3)


def test_parse_bytes_and_env(monkeypatch):
    assert gpumem.parse_bytes("2G") == 2 << 30
    assert gpumem.parse_bytes("512MiB") == 512 << 20
    assert gpumem.parse_bytes(1000) == 1000
    assert gpumem.parse_bytes("1.5k") == 1536
    for bad in ("", "lots", "-1", "0"):
        with pytest.raises(ValueError):
            gpumem.parse_bytes(bad)
    monkeypatch.delenv(gpumem.ENV_BUDGET, raising=False)
    assert gpumem.explicit_budget() is None
    assert gpumem.call_budget(torch.device("cpu"), None) is None
    monkeypatch.setenv(gpumem.ENV_BUDGET, "3M")
    assert gpumem.explicit_budget() == 3 << 20
    assert gpumem.explicit_budget("1M") == 1 << 20  # the argument wins
    assert MTCNNDetector(device="cpu")._explicit_budget == 3 << 20


@pytest.mark.parametrize(
    "exc, oom, fatal",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),
        (RuntimeError("CUDA error: out of memory"), True, False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True, False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
        (RuntimeError("CUDA error: device-side assert triggered"), False, True),
        (RuntimeError("CUDA error: unspecified launch failure (cudaErrorLaunchFailure)"), False, True),
        (RuntimeError("CUDA error: misaligned address"), False, True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"), False, True),
        (ValueError("image 0: expected HxWx3"), False, False),
        (TypeError("expected dtype uint8"), False, False),
        (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), False, False),
        (KeyError("pixels"), False, False),
    ],
)
def test_error_classification(exc, oom, fatal):
    assert gpumem.is_oom(exc) is oom
    assert gpumem.is_fatal_device_error(exc) is fatal


def test_accelerator_errors_are_fatal():
    cls = getattr(torch, "AcceleratorError", None)
    if cls is None:
        pytest.skip("torch has no AcceleratorError")
    try:
        exc = cls("CUDA error: an illegal memory access was encountered")
    except TypeError:
        pytest.skip("cannot build torch.AcceleratorError here")
    assert gpumem.is_fatal_device_error(exc)


def test_run_chunked_halves_on_oom_and_counts():
    calls = []

    def fn(start, stop):
        calls.append(stop - start)
        if stop - start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(start, stop))

    counter = gpumem.OomCounter()
    out = gpumem.run_chunked(fn, 20, 16, counter=counter, device=torch.device("cpu"), what="test")
    assert sum(out, []) == list(range(20))
    assert counter.retries == 3  # 16 -> 8 -> 4 -> 2
    assert calls[:4] == [16, 8, 4, 2]

    def always(start, stop):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        gpumem.run_chunked(always, 4, 4, counter=counter, device=torch.device("cpu"), what="test")

    def broken(start, stop):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    before = counter.retries
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpumem.run_chunked(broken, 4, 4, counter=counter, device=torch.device("cpu"), what="test")
    assert counter.retries == before  # never retried


def test_disable_tf32_sets_both_flags():
    from facebatch.models import disable_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        disable_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- the detector


def test_gpu_planning_without_budget_is_one_call_per_stage(scenes, reference):
    det = gpu_planned()
    results = det.detect(scenes)
    # Two host -> device transfers: the pixels with the image tables, and P-Net's tables.
    assert det.last_calls == {"groups": 1, "pnet": 1, "rnet": 1, "onet": 1, "uploads": 2}
    assert_same(results, reference)


def test_transfers_per_batch_do_not_grow_with_the_batch(scenes, reference):
    """Every bin, index table and image of a batch goes to the device in a constant number of
    copies (facebatch.staging), not one per image, pyramid piece or crop chunk."""
    det = gpu_planned()
    det.detect(scenes[:1])
    one = det.last_calls["uploads"]
    many = det.detect(scenes * 3)
    assert det.last_calls["uploads"] == one == 2
    assert det.last_calls["pnet"] == 1
    assert_same(many, reference * 3)
    # Images already on the device (the analyzer uploads a batch once for detection and
    # alignment) are used where they are.
    on_device = det.detect([torch.from_numpy(np.ascontiguousarray(im)) for im in scenes])
    assert det.last_calls["uploads"] == 2
    assert_same(on_device, reference)


def test_analyzer_uploads_a_batch_once_for_detection_and_alignment(scenes):
    """The analyzer's GPU path on the CPU: the batch goes to the device in one transfer, the
    detector and the alignment read it there, and the whole analysis (detect + align + embed)
    makes the same number of transfers for one image as for many, with the same results."""
    from facebatch import staging
    from facebatch.inference import FaceAnalyzer

    plain = FaceAnalyzer(device="cpu")
    plain.detector.canvas_size = CANVAS
    staged = FaceAnalyzer(device="cpu")
    staged.detector.canvas_size = CANVAS
    staged.detector._gpu_planning = True
    staged.stage_batches = True
    transfers = []
    for batch in (scenes[:1], scenes * 2):
        before = staging.TRANSFERS.count
        got = staged.analyze(batch)
        transfers.append(staging.TRANSFERS.count - before)
        want = plain.analyze(batch)
        assert [len(r.scores) for r in got] == [len(r.scores) for r in want]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
            np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
            np.testing.assert_array_equal(a.sharpness, b.sharpness)
    # The batch, the detector's image tables, P-Net's tables, the alignment's face tables.
    assert transfers == [4, 4]
    # The staged batch counts against explicit budgets (several actors sharing a GPU) while it lives.
    staged.detector._explicit_budget = staged.embedder._explicit_budget = 64 << 20
    seen = []
    detect = staged.detector.detect
    staged.detector.detect = lambda images: seen.append(staged.detector._explicit_budget) or detect(images)
    staged.analyze(scenes[:2])
    del staged.detector.detect
    assert seen == [(64 << 20) - sum(im.shape[0] * im.shape[1] * 3 for im in scenes[:2])]
    assert staged.detector._explicit_budget == staged.embedder._explicit_budget == 64 << 20
    staged.detector._explicit_budget = staged.embedder._explicit_budget = None
    # Images already on the device (nvJPEG decodes there) stay there, next to uploaded ones.
    mixed = [torch.from_numpy(np.ascontiguousarray(im)) if k % 2 else im for k, im in enumerate(scenes)]
    got = staged.analyze(mixed)
    for a, b in zip(got, plain.analyze(scenes)):
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_small_budget_gives_same_results_in_more_calls(scenes, reference):
    budget = 8 << 20  # 8 MiB: one image per group, one canvas per P-Net call, a few crops per call
    det = gpu_planned(memory_budget_bytes=budget)
    results = det.detect(scenes)
    calls = det.last_calls
    assert calls["groups"] == len(scenes)
    assert calls["pnet"] > len(scenes) and calls["rnet"] > len(scenes) and calls["onet"] > len(scenes)
    assert det.oom_retries == 0
    assert calls["uploads"] == 2 * calls["groups"]  # per image group, not per call
    assert_same(results, reference)
    # The budget bounds each call: no P-Net call was given more canvases than fit.
    medium = gpu_planned(memory_budget_bytes=64 << 20)
    assert_same(medium.detect(scenes), reference)
    assert 1 <= medium.last_calls["groups"] < calls["groups"]
    assert medium.last_calls["pnet"] < calls["pnet"]


def test_out_of_memory_halves_the_call_and_counts(scenes, reference):
    det = gpu_planned()
    limits = {"pnet": 2, "rnet": 40, "onet": 5}
    sizes = {"pnet": [], "rnet": [], "onet": []}

    def limited(fn, stage):
        def wrapper(x, *args):
            sizes[stage].append(x.shape[0])
            if x.shape[0] > limits[stage]:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated {stage})")
            return fn(x, *args)

        return wrapper

    det._fast_pnet = limited(det._fast_pnet, "pnet")
    det._rnet_fast = limited(det._rnet_fast, "rnet")
    det._onet_fast = limited(det._onet_fast, "onet")
    results = det.detect(scenes)
    assert_same(results, reference)
    assert det.oom_retries >= 3
    for stage in sizes:
        assert max(sizes[stage]) > limits[stage]  # the first call was too big ...
        assert det.last_calls[stage] > 1  # ... and the work went through in smaller ones


def test_other_errors_are_not_retried(scenes):
    det = gpu_planned()

    def broken(x, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    det._rnet_fast = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        det.detect(scenes[:1])
    assert det.oom_retries == 0


def test_memory_model_covers_measured_peaks(scenes):
    """The per-pixel / per-crop figures stay above what the stages allocate (CPU tensors,
    measured by gpumem.peak_tensor_bytes; the CUDA peak is reported by bench/gpu_check.py)."""
    det = gpu_planned()
    measured = {}
    run_net, stage_pnet, fast_pnet = det._run_net, det._stage_pnet, det._fast_pnet
    canvas_pixels = []

    def measure_run_net(net, sample, n, *args):
        out, peak = gpumem.peak_tensor_bytes(lambda: run_net(net, sample, n, *args))
        measured[args[-1]] = peak / n
        return out

    def measure_stage_pnet(*args):
        out, peak = gpumem.peak_tensor_bytes(lambda: stage_pnet(*args))
        measured["pnet_peak"] = peak
        return out

    def record_pnet(x, *args):
        canvas_pixels.append(x.shape[0] * x.shape[2] * x.shape[3])
        return fast_pnet(x, *args)

    det._run_net, det._stage_pnet, det._fast_pnet = measure_run_net, measure_stage_pnet, record_pnet
    det.detect(scenes)
    per_pixel = measured["pnet_peak"] / sum(canvas_pixels)
    assert 40 < per_pixel < PNET_BYTES_PER_PIXEL / 1.4, per_pixel
    assert measured["rnet"] < RNET_BYTES_PER_CROP / 1.4, measured
    assert measured["onet"] < ONET_BYTES_PER_CROP / 1.4, measured


# --------------------------------------------------------------------------- the embedder


@pytest.fixture(scope="module")
def chips(astronaut_rgb):
    from facebatch.embedder import FaceEmbedder

    points = np.array([[203.2, 101.5], [246.5, 104.2], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]], np.float32)
    rng = np.random.default_rng(0)
    landmarks = np.stack([points + rng.normal(0, 2, points.shape).astype(np.float32) for _ in range(5)])
    return FaceEmbedder(device="cpu").align([astronaut_rgb], np.zeros(5, np.int64), landmarks)


def test_embedder_small_budget_same_vectors_more_calls(chips):
    from facebatch.embedder import EMBED_BYTES_PER_IMAGE, FaceEmbedder

    full = FaceEmbedder(device="cpu")
    reference = full.embed_chips(chips)
    assert full.last_calls == 1
    small = FaceEmbedder(device="cpu", memory_budget_bytes=4 * EMBED_BYTES_PER_IMAGE)  # 2 chips (flip: 4 images)
    vectors = small.embed_chips(chips)
    assert small.last_calls == 3
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    # Measured bytes per network input stay below the figure.
    _, peak = gpumem.peak_tensor_bytes(lambda: full.raw_descriptors(chips))
    assert peak / len(chips) < EMBED_BYTES_PER_IMAGE / 1.4


def test_embedder_out_of_memory_halves_the_batch(chips):
    from facebatch.embedder import FaceEmbedder

    emb = FaceEmbedder(device="cpu")
    reference = emb.embed_chips(chips)
    network = emb.network

    def limited(x):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return network(x)

    emb.network = limited
    np.testing.assert_allclose(emb.embed_chips(chips), reference, atol=1e-5)
    assert emb.oom_retries == 1  # 5 chips (10 images) failed; then calls of 2, 2, 1 chips
    assert emb.last_calls == 3


# --------------------------------------------------------------------------- the Ray actor's logic, without Ray


class FakeAnalyzer:
    """Stands in for FaceAnalyzer: fails as told, per batch or per image."""

    def __init__(self, fail):
        self.fail = fail  # (images) -> exception or None
        self.oom_retries = 0
        self.detector = type("D", (), {"device": torch.device("cpu")})()
        self.calls = []

    def analyze(self, images, scales, times):
        from facebatch.inference import ImageFaces

        self.calls.append(len(images))
        exc = self.fail(images)
        if exc is not None:
            raise exc
        self.oom_retries += 1  # as if the models halved one call
        empty = np.zeros((0,), np.float32)
        return [ImageFaces(np.zeros((0, 4), np.float32), empty, np.zeros((0, 5, 2), np.float32), None,
                           empty, empty, empty, empty) for _ in images]


def decoded_batch(n: int) -> pa.Table:
    from facebatch.tables import DECODED_SCHEMA

    rows = []
    for i in range(n):
        h, w = 8, 10 + i
        rows.append({"image_id": f"id{i}", "uri": f"file:///p{i}.jpg", "etag": "e", "size_bytes": 1, "width": w,
                     "height": h, "format": "JPEG", "status": "ok", "error": None, "scale": 1.0, "pix_h": h,
                     "pix_w": w, "pixels": np.full((h, w, 3), i, np.uint8).tobytes(), "fetch_s": 0.0, "decode_s": 0.0})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def actor(analyzer):
    from facebatch.pipeline import FaceModelActor

    obj = FaceModelActor.__new__(FaceModelActor)  # no models: the analyzer is the fake
    obj.embed, obj.decode, obj.analyzer = False, None, analyzer
    obj.jpeg_decoder, obj.limits = None, {"max_pixels": 100_000_000, "max_side": 2048}
    return obj


def test_actor_isolates_a_bad_image():
    def fail(images):
        if any(im[0, 0, 0] == 2 for im in images):
            return ValueError("image 0: expected HxWx3")
        return None

    out = actor(FakeAnalyzer(fail))(decoded_batch(4))
    assert out.column("status").to_pylist() == ["ok", "ok", "failed", "ok"]
    assert "expected HxWx3" in out.column("error").to_pylist()[2]
    assert sum(out.column("oom_retries").to_pylist()) == 3  # the three images that went through


def test_actor_retries_an_out_of_memory_batch_image_by_image():
    def fail(images):
        return torch.OutOfMemoryError("CUDA out of memory (simulated)") if len(images) > 1 else None

    analyzer = FakeAnalyzer(fail)
    out = actor(analyzer)(decoded_batch(3))
    assert out.column("status").to_pylist() == ["ok"] * 3
    assert analyzer.calls == [3, 1, 1, 1]
    assert sum(out.column("oom_retries").to_pylist()) == 1 + 3


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "CUDA error: unspecified launch failure",
])
def test_actor_reraises_sticky_cuda_errors(message):
    analyzer = FakeAnalyzer(lambda images: RuntimeError(message))
    with pytest.raises(RuntimeError, match=message.split(": ")[1]):
        actor(analyzer)(decoded_batch(3))
    assert analyzer.calls == [3]  # no image-by-image retry in a poisoned context


def test_actor_reraises_a_sticky_error_met_while_isolating():
    def fail(images):
        if len(images) > 1:
            return ValueError("bad image somewhere")
        if images[0][0, 0, 0] == 1:
            return RuntimeError("CUDA error: an illegal memory access was encountered")
        return None

    with pytest.raises(RuntimeError, match="illegal memory access"):
        actor(FakeAnalyzer(fail))(decoded_batch(3))
