"""bench/gpu_check.py runs end to end on the CPU (its GPU checks take the CPU path there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu(tmp_path, astronaut_rgb):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut_rgb).save(photos / "astronaut.jpg", quality=92)
    wide = np.concatenate([astronaut_rgb, astronaut_rgb[:, ::-1]], axis=1)
    Image.fromarray(np.ascontiguousarray(wide)).save(photos / "two.png")
    (photos / "not-a-photo.jpg").write_bytes(b"no image here")  # skipped, not fatal
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--photos", str(photos),
         "--limit", "2", "--max-side", "640", "--batch-sizes", "1,2", "--seconds-per-config", "0.5",
         "--decode-seconds", "0.5", "--threads", "1", "--small-budget", "8M", "--json", str(report_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["photos"]["count"] == 2
    parity = report["parity"]
    assert parity["ok"] and parity["faces_cpu"] == parity["faces_device"] >= 3
    assert parity["max_box_diff_px"] < 1e-2 and parity["max_score_diff"] < 1e-4
    budget = report["budget"]
    assert budget["ok"] and budget["budget_bytes"] == 8 << 20 and budget["oom_retries"] == 0
    assert sum(budget["calls_budgeted"].values()) > sum(budget["calls_unlimited"].values())
    assert {(r["what"], r["batch"]) for r in report["throughput"]} == {
        ("detect", 1), ("detect", 2), ("detect+embed", 1), ("detect+embed", 2)}
    assert all(r["images_per_s"] > 0 and r["oom_retries"] == 0 for r in report["throughput"])
    assert report["runtime_calls_per_batch"]["aten_ops"] > 0
    assert report["runtime_calls_per_batch"]["facebatch_transfers"] == 4  # batch, two detector tables, alignment
    decoding = report["jpeg_decoding"]
    assert (decoding["photos"], decoding["passed_on"]) == (2, 1)  # the JPEG, not the PNG
    assert decoding["cpu_decoder"]["images_per_s"] > 0
    assert "needs CUDA inference actors" in decoding["nvjpeg"]["skipped"]
    assert "PASS" in proc.stdout
