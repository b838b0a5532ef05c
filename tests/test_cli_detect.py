"""`facebatch detect PATH... --json [--embed]` and the per-face quality figures."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def detect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facebatch.cli", "detect", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut_rgb):
    root = tmp_path_factory.mktemp("photos")
    upright = Image.fromarray(astronaut_rgb)
    upright.save(root / "upright.jpg", quality=95)
    # Stored sideways, EXIF orientation 6: viewers (and we) rotate it 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "sideways.jpg", quality=95, exif=exif.tobytes())
    (root / "broken.jpg").write_bytes((root / "upright.jpg").read_bytes()[:3000])
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(root / "blank.png")
    return root


def test_detect_prints_one_json_object_per_file_and_goes_on_after_errors(photos):
    files = [photos / n for n in ("upright.jpg", "broken.jpg", "sideways.jpg", "blank.png", "missing.jpg")]
    run = detect(*map(str, files), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(f) for f in files]
    upright, broken, sideways, blank, missing = lines
    assert upright["error"] is None and (upright["width"], upright["height"]) == (512, 512)
    assert len(upright["faces"]) == 1
    face = upright["faces"][0]
    assert set(face) == {"box", "score", "landmarks"} and face["score"] > 0.99 and len(face["landmarks"]) == 5
    x1, y1, x2, y2 = face["box"]
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200  # the astronaut's face
    assert broken["faces"] == [] and broken["error"].startswith("truncated")
    assert blank["error"] is None and blank["faces"] == []
    assert missing["error"].startswith("unreadable")
    # EXIF applied: the sideways file reports the oriented size and the same face position.
    assert sideways["error"] is None and (sideways["width"], sideways["height"]) == (512, 512)
    assert np.allclose(sideways["faces"][0]["box"], face["box"], atol=6)


def test_detect_embed_adds_a_unit_embedding(photos):
    run = detect(str(photos / "upright.jpg"), str(photos / "sideways.jpg"), "--json", "--embed")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (json.loads(line)["faces"][0]["embedding"] for line in run.stdout.splitlines())
    assert len(a) == 128 and abs(np.linalg.norm(a) - 1) < 1e-4
    assert float(np.dot(a, b)) > 0.95  # the same face, rotated back by EXIF


def test_detect_in_worker_processes_prints_what_one_process_prints(photos):
    """Worker processes (one single-threaded process per core by default on CPU) read, decode and
    analyse whole batches; the output keeps the files' order, errors included, and the same faces."""
    names = ("upright.jpg", "broken.jpg", "sideways.jpg", "blank.png", "missing.jpg")
    files = [str(photos / n) for n in names] * 3
    outputs = {}
    for workers in ("1", "2"):
        run = detect(*files, "--batch-size", "2", "--workers", workers)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[workers] = [json.loads(line) for line in run.stdout.splitlines()]
    one, two = outputs["1"], outputs["2"]
    assert [line["path"] for line in two] == files
    for a, b in zip(one, two):
        assert (a["error"], a["width"], a["height"], len(a["faces"])) == (b["error"], b["width"], b["height"], len(b["faces"]))
        for fa, fb in zip(a["faces"], b["faces"]):
            # Other batch sizes move results by float rounding only.
            assert np.allclose(fa["box"], fb["box"], atol=0.05) and abs(fa["score"] - fb["score"]) < 1e-4
    assert sum(len(line["faces"]) for line in two) == 6  # the astronaut in both orientations, three times


def test_detect_worker_count():
    import argparse

    from facebatch.cli import detect_workers

    def workers(batches, **options):
        args = argparse.Namespace(**{"workers": None, "threads": None, "device": "cpu", **options})
        return detect_workers(args, batches)

    import os

    cores = len(os.sched_getaffinity(0))
    assert workers(1) == 1  # one batch: no process to start
    assert workers(100) == cores and workers(2) == min(cores, 2)
    assert workers(100, threads=2) == 1  # --threads: the command's own process, with that many threads
    assert workers(100, device="cuda") == 1
    assert workers(100, workers=3) == 3 and workers(2, workers=3) == 2  # never more than batches


@pytest.mark.parametrize(
    "args, message",
    [
        (["--thresholds", "0.6,0.7"], "three comma-separated numbers"),
        (["--min-face-size", "5"], "min_face_size must be an integer >= 12"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--workers", "0"], "expected a positive integer"),
    ],
)
def test_detect_bad_arguments_fail_fast(photos, args, message):
    run = detect(str(photos / "upright.jpg"), *args)
    assert run.returncode == 2
    assert message in run.stderr


def test_quality_figures(astronaut_rgb):
    from facebatch.inference import FaceAnalyzer, pose_figures

    analyzer = FaceAnalyzer(device="cpu")
    sharp, = analyzer.analyze([astronaut_rgb])
    blurred_img = np.asarray(Image.fromarray(astronaut_rgb).filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(3)))
    blurred, = analyzer.analyze([blurred_img])
    assert len(sharp) == len(blurred) == 1
    assert blurred.sharpness[0] < 0.5 * sharp.sharpness[0]
    assert abs(sharp.roll[0]) < 15 and abs(sharp.yaw[0]) < 0.5
    assert 60 < sharp.face_size[0] < 130
    # Pose figures on synthetic landmarks: a level frontal face, and one rolled by 30 degrees.
    frontal = np.array([[[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]], np.float32)
    roll, yaw = pose_figures(frontal)
    assert abs(roll[0]) < 1e-4 and abs(yaw[0]) < 1e-4
    angle = np.radians(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    roll, yaw = pose_figures(frontal @ rot.T)
    assert abs(roll[0] - 30) < 1e-3 and abs(yaw[0]) < 1e-4
    turned = frontal.copy()
    turned[0, 2, 0] = 66  # nose towards the right eye: head turned
    assert pose_figures(turned)[1][0] > 0.7
