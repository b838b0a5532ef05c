"""What a fresh process's first detector call costs, with and without numba's set-up.

The detector samples its first call with torch and loads its compiled samplers
(`facebatch/area_kernels.py`, numba) at its second (see `MTCNNDetector.detect`). This times, each
in a fresh process on one thread, the corpus's first 4 photos as the first call, then all 153
photos (those 4, then batches of 16), then a second, warm pass over the 153:

- "torch first": the detector as it is;
- "compiled first": the same detector made to use the compiled samplers from its first call
  (what it did before 2026-12-01), so numba's set-up falls into that call;
- "torch always": the same detector kept on the torch samplers for every call (what the
  compiled samplers save once they are loaded).

The modes alternate, --rounds times each. Both give the same detections (tests/test_detector.py).

    FACEBATCH_SHARED_DATA=../shared/data .venv/bin/python bench/bench_first_call.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("torch first", "compiled first", "torch always")


def measure(mode: str) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_detector import load_images

    from facebatch.detector import MTCNNDetector

    images = load_images(None)[1]
    detector = MTCNNDetector()

    def detect(batch):
        # The detector counts its calls to choose the sampler (see MTCNNDetector.detect).
        if mode == "compiled first":
            detector._calls = max(detector._calls, 1)
        elif mode == "torch always":
            detector._calls = 0
        return detector.detect(batch)

    t0 = time.perf_counter()
    faces = sum(len(d) for d in detect(images[:4]))
    first = time.perf_counter() - t0
    for i in range(4, len(images), 16):
        faces += sum(len(d) for d in detect(images[i : i + 16]))
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(images), 16):
        detect(images[i : i + 16])
    return {"first_call_s": first, "all_s": whole, "warm_pass_s": time.perf_counter() - t0, "faces": faces,
            "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode)))
        return
    print(f"{'':16s} {'first 4 photos s':>17s} {'all photos s':>13s} {'warm pass s':>12s} {'faces':>6s}")
    for _ in range(args.rounds):
        for mode in MODES:
            run = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{mode:16s} {r['first_call_s']:17.2f} {r['all_s']:13.2f} {r['warm_pass_s']:12.2f} {r['faces']:6d}",
                  flush=True)


if __name__ == "__main__":
    main()
