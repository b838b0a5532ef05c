"""How far --gpu-jpeg-decode's arrays are from the CPU decoder's, with libjpeg in nvJPEG's place.

    PYTHONPATH=$PWD .venv/bin/python bench/jpeg_reduction_parity.py

For every JPEG of the shared corpus that the device path takes (facebatch.decode.plan_jpeg), at
--max-side 2048 and 512: the array of facebatch.device_jpeg.DeviceJpegDecoder, fed by libjpeg
through OpenCV (opencv_batch_decode, nvJPEG's interface), against facebatch.decode.decode_image's.
Without DCT scaling they must be equal; with it, the block average differs from libjpeg's scaled
IDCT and the table says by how much. nvJPEG's own IDCT difference is measured by bench/gpu_check.py
on a GPU.
"""

from __future__ import annotations

import sys

import numpy as np

import benchlib
from benchlib import SHARED

from facebatch.decode import decode_image, plan_jpeg  # noqa: E402
from facebatch.device_jpeg import DeviceJpegDecoder, opencv_batch_decode  # noqa: E402


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--max-sides", default="2048,512")
    args = parser.parse_args()
    paths = sorted(p for p in (SHARED / "faces").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        print(f"no JPEGs under {SHARED / 'faces'} (set FACEBATCH_SHARED_DATA)", file=sys.stderr)
        return 2
    planned = other = equal = 0
    scaled: list[tuple[float, float, int]] = []  # mean, p99, max |difference| per reduced decode
    for max_side in (int(s) for s in args.max_sides.split(",")):
        decoder = DeviceJpegDecoder(opencv_batch_decode, max_side=max_side)
        for path in paths:
            data = path.read_bytes()
            plan = plan_jpeg(data, max_side=max_side)
            if plan is None:
                other += 1
                continue
            planned += 1
            got = decoder.decode([data])[0].numpy().astype(np.int16)
            want = decode_image(data, max_side=max_side).rgb.astype(np.int16)
            if got.shape != want.shape:
                print(f"FAIL {path.name} (max side {max_side}): shape {got.shape} against {want.shape}")
                return 1
            diff = np.abs(got - want)
            if plan.factor == 1:
                if diff.any():
                    print(f"FAIL {path.name} (max side {max_side}): full-size arrays differ")
                    return 1
                equal += 1
            else:
                scaled.append((float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max())))
    print(f"{planned} decodes taken by the device path ({other} left to the CPU decoder); "
          f"{equal} at full size, all equal to the CPU decoder's arrays")
    if scaled:
        means = [s[0] for s in scaled]
        print(f"{len(scaled)} with DCT scaling: mean |difference| {np.mean(means):.2f} grey levels "
              f"(worst photo {max(means):.2f}), 99th percentile at most {max(s[1] for s in scaled):.0f}, "
              f"largest {max(s[2] for s in scaled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
