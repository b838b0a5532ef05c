"""Would a cheaper approximation keep the detector's parity with facenet-pytorch? Each variant
runs the detector over the parity corpus with one approximation put in, and is scored by the
parity criteria of tests/test_detector_parity.py.

    PYTHONPATH=$PWD .venv/bin/python bench/approximation_parity.py [--variants exact,opencv-area,...]
                                                                  [--batch-size 32] [--threads 2]

Variants (comma-separated; each runs in a fresh process, because it patches the detector):

- ``exact``: the detector as it ships.
- ``opencv-area``: P-Net's pyramid levels from ``cv2.resize(..., INTER_AREA)`` of the uint8
  image, as issue 10 suggested, instead of the integral-image sampler (R-/O-Net crops unchanged).
  OpenCV weighs the pixels a bin covers in part; facenet-pytorch's area interpolation (adaptive
  average pooling) averages whole pixels over overlapping integer bins.
- ``opencv-area-chained``: the same, each level resized from the one before (less to read).
- ``int8-weights:NETS``, ``int8:NETS``: NETS is ``pnet``, ``rnet``, ``onet`` or several joined by
  ``+``. Their convolution and dense weights rounded to int8 (symmetric, one scale per output
  channel); with ``int8:``, every layer's input but the first also rounded to 8 bits (one scale
  and zero point per tensor, from each call's own min and max: the most favourable calibration
  an int8 engine could have). This simulates in float32 what int8 arithmetic computes (the
  products of 8-bit numbers and their int32 sums are exact in float32 up to rounding of the
  sums), so it measures parity, not speed: these rows print no time.

Reported per variant: reference faces matched at IoU >= 0.9 (the parity asks 98%), the mean
landmark error as a fraction of the box width (at most 3%), confident faces the reference does not
have (at most 2%), and for the exact and pyramid variants the seconds of a warm pass (after two
calls that set the compiled samplers up) and of its pyramid stage. Written against the detector's
private sampler and P-Net module (`_PNetTables`, `_IntegralImages`, `_FastPNet`): a one-off
measurement kept so that its numbers in bench/RESULTS.md can be reproduced.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import numpy as np
import torch

import benchlib
from benchlib import SHARED

NETS = ("pnet", "rnet", "onet")
#: How often each patched path ran: a variant whose patch never ran (the detector's private names
#: changed) fails instead of measuring the exact detector under another name.
CALLS = {"opencv": 0, "int8 activations": 0}


def _patch_opencv_pyramid(D, chained: bool) -> None:
    """P-Net's canvases sampled from cv2.resize(INTER_AREA) levels instead of the integral image."""
    import cv2

    tables_init = D._PNetTables.__init__

    def init_tables(self, image_shapes, levels, pieces, *args, **kwargs):
        tables_init(self, image_shapes, levels, pieces, *args, **kwargs)
        for p in range(len(pieces.level)):
            lvl = int(pieces.level[p])
            self.host_bins[p] = ("opencv", lvl, int(levels["image"][lvl]), int(levels["h"][lvl]),
                                 int(levels["w"][lvl]), int(pieces.in_row[p]), int(pieces.in_col[p]),
                                 int(pieces.height[p]), int(pieces.width[p]))

    integral_init = D._IntegralImages.__init__

    def init_integral(self, images, *args, **kwargs):
        integral_init(self, images, *args, **kwargs)
        self.opencv_images = images
        self.opencv_levels = {}

    def sample(self, i, bins, out, out_base, out_row_stride):
        CALLS["opencv"] += 1
        _, lvl, image, lh, lw, r0, c0, h, w = bins
        if lvl not in self.opencv_levels:
            source = self.opencv_images[image]
            if chained:  # the smallest level of this image so far (levels come largest first)
                done = [k for k, (img, _) in self.opencv_levels.items() if img == image]
                if done:
                    source = self.opencv_levels[max(done)][1]
            self.opencv_levels[lvl] = (image, cv2.resize(source, (lw, lh), interpolation=cv2.INTER_AREA))
        pixels = self.opencv_levels[lvl][1][r0 : r0 + h, c0 : c0 + w].reshape(h, w * 3)
        flat = out.view(-1).numpy()
        piece = np.lib.stride_tricks.as_strided(flat[out_base:], shape=(h, w * 3), strides=(out_row_stride * 4, 4))
        np.subtract(pixels, np.float32(127.5), out=piece, dtype=np.float32)
        piece *= np.float32(0.0078125)

    D._PNetTables.__init__ = init_tables
    D._IntegralImages.__init__ = init_integral
    D._IntegralImages.sample_grid_host = sample


def _int8_weight(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp(min=1e-12)[:, None] / 127
    out = (torch.round(flat / scale).clamp(-127, 127) * scale).reshape(w.shape)
    return out.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else out


def _int8_activation(x: torch.Tensor) -> torch.Tensor:
    CALLS["int8 activations"] += 1
    lo, hi = x.min(), x.max()
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    return ((torch.round(x / scale) + zero).clamp(0, 255) - zero) * scale


def _patch_int8(D, detector, nets: list[str], activations: bool) -> None:
    if "pnet" in nets:
        pnet = detector._fast_pnet
        for name in ("w1", "w2", "w3", "wh"):
            setattr(pnet, name, _int8_weight(getattr(pnet, name)))
        if activations:
            conv2d = D.F.conv2d

            def quantised_conv2d(x, w, *args, **kwargs):
                # The first layer's input, the canvas, has 256 levels already: exact in 8 bits.
                return conv2d(x if w is pnet.w1 else _int8_activation(x), w, *args, **kwargs)

            functional = types.SimpleNamespace(**{n: getattr(D.F, n) for n in dir(D.F) if not n.startswith("__")})
            functional.conv2d = quantised_conv2d
            D.F = functional
    for name in ("rnet", "onet"):
        if name not in nets:
            continue
        layers = [m for m in getattr(detector, f"_{name}_fast").modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        for k, layer in enumerate(layers):
            with torch.no_grad():
                layer.weight.copy_(_int8_weight(layer.weight))
            if activations and k:
                layer.register_forward_pre_hook(lambda module, args: (_int8_activation(args[0]),))


def run_variant(variant: str, batch_size: int) -> dict:
    import facebatch.detector as D
    from facebatch.evaluation import reference_parity
    from test_detector_parity import load_reference_images

    detector = D.MTCNNDetector(device="cpu", max_pixels=None)
    timed = True
    if variant in ("opencv-area", "opencv-area-chained"):
        _patch_opencv_pyramid(D, chained=variant.endswith("chained"))
    elif variant.startswith(("int8:", "int8-weights:")):
        kind, nets = variant.split(":")
        nets = nets.split("+")
        if not nets or set(nets) - set(NETS):
            raise SystemExit(f"{variant}: name networks among {', '.join(NETS)}, joined by +")
        _patch_int8(D, detector, nets, activations=kind == "int8")
        timed = False
    elif variant != "exact":
        raise SystemExit(f"unknown variant {variant!r} (see --help)")
    names, images, faces = load_reference_images(SHARED)
    order = np.argsort([im.shape[0] * im.shape[1] for im in images], kind="stable")
    detector.detect(images[:2])
    detector.detect(images[:2])  # the compiled samplers (which the pyramid variants replace) from here on
    results = [None] * len(images)
    pyramid = 0.0
    start = time.perf_counter()
    for at in range(0, len(order), batch_size):
        idx = order[at : at + batch_size]
        for i, found in zip(idx, detector.detect([images[i] for i in idx])):
            results[i] = found
        pyramid += detector.last_stage_seconds.get("pyramid", 0.0)
    seconds = time.perf_counter() - start
    for path, expected in (("opencv", variant.startswith("opencv")), ("int8 activations", variant.startswith("int8:"))):
        if expected and not CALLS[path]:
            raise SystemExit(f"{variant}: its patch never ran (the detector's private names changed?)")
    stats = reference_parity(results, faces)
    stats.update(variant=variant, images=len(images), seconds=seconds if timed else None,
                 pyramid_seconds=pyramid if timed else None)
    return stats


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--variants", default="exact,opencv-area,opencv-area-chained,int8-weights:pnet,int8:pnet,"
                        "int8-weights:rnet,int8:rnet,int8-weights:onet,int8:onet,int8:rnet+onet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help="run one variant in this process and print its JSON (what each row's subprocess does)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        import cv2

        cv2.setNumThreads(args.threads)
        print(json.dumps(run_variant(args.one, args.batch_size)))
        return
    from facebatch.evaluation import parity_ok

    if not (SHARED / "reference" / "mtcnn_facenet_pytorch.json").is_file():
        sys.exit(f"shared corpus not found at {SHARED} (set FACEBATCH_SHARED_DATA)")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}")
    print("| variant | matched at IoU 0.9 | landmark error | extra faces | parity | seconds | pyramid stage |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", variant, "--batch-size", str(args.batch_size),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        s = json.loads(done.stdout.strip().splitlines()[-1])
        ok = parity_ok(s)
        timing = (f"{s['seconds']:.2f} | {s['pyramid_seconds']:.2f}" if s["seconds"] is not None
                  else "n/a (simulated) | n/a")
        print(f"| {variant} | {s['matched']} / {s['reference_faces']} ({s['recall_vs_reference']:.1%}) | "
              f"{s['mean_landmark_error_frac_width']:.2%} | {s['extra_confident']} ({s['extra_frac']:.1%}) | "
              f"{'kept' if ok else 'lost'} | {timing} |", flush=True)


if __name__ == "__main__":
    main()
