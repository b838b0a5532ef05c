"""Embedder throughput on CPU: descriptors/s of the network and chips/s of the alignment.

    .venv/bin/python bench/bench_embedder.py [--threads 2] [--batch 64] [--repeats 5] [--compile]

Inputs are real: skimage's astronaut (public domain) cut by our alignment, tiled to the batch
size, and for the alignment a batch of photos of different sizes (one face each, some faces big
enough to go through the pyramid). Prints a small table; timings are best-of-N wall clock.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import benchlib

from facebatch.alignment import align_faces  # noqa: E402
from facebatch.dlib_model import load_dlib_resnet, read_dlib_resnet  # noqa: E402
from facebatch.embedder import FaceEmbedder  # noqa: E402

# MTCNN-style points of the astronaut's face (eye centres, nose tip, mouth corners), measured once
# with dlib's 68-point model; used only to produce realistic chips and warps.
ASTRONAUT_POINTS = np.array(
    [[203.2, 101.5], [246.5, 104.2], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]], dtype=np.float32
)


def best_time(function, repeats: int) -> float:
    function()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow start-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    astronaut = data.astronaut()
    rows: list[tuple[str, str, str]] = []

    start = time.perf_counter()
    read_dlib_resnet()
    rows.append(("read + validate .dat", f"{(time.perf_counter() - start) * 1000:.0f} ms", "no cache needed"))
    start = time.perf_counter()
    embedder = FaceEmbedder(device="cpu", batch_size=args.batch)
    rows.append(("FaceEmbedder() start-up", f"{(time.perf_counter() - start) * 1000:.0f} ms", ""))

    chip = align_faces([astronaut], [0], ASTRONAUT_POINTS[None]).numpy()
    chips = np.repeat(chip, args.batch, axis=0)
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float()

    # The variants are timed round-robin (best of N each), so that load from other processes
    # on a shared machine hits them alike rather than whichever happened to run then.
    network = embedder.network
    channels_last_input = x.contiguous(memory_format=torch.channels_last)
    contiguous = load_dlib_resnet().eval()
    variants = {
        f"network fp32 channels_last, batch {args.batch}": (network, channels_last_input, "default"),
        f"network fp32 NCHW, batch {args.batch}": (contiguous, x.contiguous(), ""),
    }
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(network)
        with torch.inference_mode():
            compiled(channels_last_input)
        compile_s = time.perf_counter() - start
        variants["network torch.compile, channels_last"] = (compiled, channels_last_input, f"first call {compile_s:.0f} s")

    def forward(model, inputs):
        with torch.inference_mode():
            model(inputs)

    for model, inputs, _ in variants.values():
        forward(model, inputs)  # warm-up
    forward_runs = {name: [] for name in variants}
    api_runs = []
    for _ in range(args.repeats):
        for name, (model, inputs, _) in variants.items():
            start = time.perf_counter()
            forward(model, inputs)
            forward_runs[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        embedder.embed_chips(chips)
        api_runs.append(time.perf_counter() - start)
    for name, (_, _, note) in variants.items():
        rows.append((name, f"{args.batch / min(forward_runs[name]):.0f} desc/s", note))
    rows.append((f"embed_chips (uint8 in, unit vectors out), batch {args.batch}", f"{args.batch / min(api_runs):.0f} desc/s", ""))

    # Alignment: photos of several sizes, one face each (scales 0.5x-4x: pyramid levels 0-2).
    import cv2

    scales = [0.5, 1.0, 1.5, 2.0, 2.5, 4.0]
    images = [cv2.resize(astronaut, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC) for s in scales]
    count = args.batch
    image_index = np.arange(count) % len(images)
    landmarks = np.stack([ASTRONAUT_POINTS * scales[i] for i in image_index])
    for antialias in (True, False):
        seconds = best_time(lambda: align_faces(images, image_index, landmarks, antialias=antialias), args.repeats)
        rows.append((f"align {count} faces from {len(images)} photos (antialias={antialias})", f"{count / seconds:.0f} chips/s", f"{seconds * 1000:.0f} ms"))
    small = [images[1]]
    seconds = best_time(lambda: align_faces(small, np.zeros(count, np.int64), np.repeat(ASTRONAUT_POINTS[None], count, 0)), args.repeats)
    rows.append((f"align {count} faces from one 512x512 photo", f"{count / seconds:.0f} chips/s", f"{seconds * 1000:.0f} ms"))

    seconds = best_time(lambda: embedder.embed(images, image_index, landmarks), max(1, args.repeats // 2))
    rows.append((f"embed() end to end, {count} faces", f"{count / seconds:.0f} faces/s", ""))

    width = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; best of {args.repeats}")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
