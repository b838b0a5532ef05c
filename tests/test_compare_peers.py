"""bench/compare_peers.py: its table arithmetic on fixed numbers, its --help, and the facebatch
side of its worker on a tiny image (the peers' side needs their multi-GB venv: run the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.compare_peers import cpu_description, format_table, speedup

REPO = Path(__file__).resolve().parent.parent


def test_speedup():
    assert speedup(23.4, 7.8) == pytest.approx(3.0)
    assert speedup(None, 7.8) is None
    assert speedup(23.4, None) is None


def test_format_table_ratios_against_each_groups_baseline():
    rows = [
        {"key": "facenet", "group": "detection", "label": "facenet", "seconds": 20.0, "images": 100, "faces": 50, "cpu_s": 39.0},
        {"key": "facebatch-detect-32", "group": "detection", "label": "ours b32", "seconds": 5.0, "images": 100, "faces": 51, "cpu_s": 9.5},
        {"key": "dlib", "group": "pipeline", "label": "dlib", "seconds": 60.0, "images": 100, "faces": 40, "cpu_s": 60.0},
        {"key": "facebatch-pipeline", "group": "pipeline", "label": "ours full", "seconds": 8.0, "images": 100, "faces": 51, "cpu_s": None},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| | seconds | images/s | faces")
    assert lines[2] == "| facenet | 20.00 | 5.0 | 50 | 39.0 | 1.0x vs facenet-pytorch |"
    assert lines[3] == "| ours b32 | 5.00 | 20.0 | 51 | 9.5 | 4.0x vs facenet-pytorch |"
    assert lines[4].endswith("| 1.0x vs dlib |")
    assert lines[5] == "| ours full | 8.00 | 12.5 | 51 |  | 7.5x vs dlib |"


def test_cpu_description_names_the_model_and_its_vector_extensions():
    cpuinfo = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 sha_ni\n\n"
               "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 sha_ni\n")
    assert cpu_description(cpuinfo) == "AMD EPYC 9R14 (avx2 fma avx512f avx512_bf16)"
    assert cpu_description("model name : Old\nflags : fpu sse2\n") == "Old (no AVX2)"
    assert cpu_description() != ""  # this machine's, from /proc/cpuinfo


def test_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_peers.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--photos" in out and "--limit" in out and "--threads" in out


def test_worker_runs_facebatch_pipeline(tmp_path):
    """The worker's facebatch-pipeline task (FaceAnalyzer: detector + embedder) on 3 small images."""
    task, batch = "facebatch-pipeline", 2
    rng = np.random.default_rng(0)
    npz = tmp_path / "images.npz"
    np.savez(npz, **{f"{i:06d}": rng.integers(0, 255, (60 + 8 * i, 80, 3), dtype=np.uint8) for i in range(3)})
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "peers" / "worker.py"), task, "--images", str(npz),
                           "--threads", "1", "--warmup", "1", "--batch-size", str(batch)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["task"] == task and result["images"] == 3 and result["faces"] >= 0
    assert result["seconds"] > 0 and result["versions"]["torch"]
