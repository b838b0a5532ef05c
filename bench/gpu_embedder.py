"""Embedder on a CUDA GPU: fp16/bf16 autocast accuracy against fp32, and throughput by batch size.

    python bench/gpu_embedder.py                      # on a CUDA machine, < 5 minutes
    python bench/gpu_embedder.py --device cpu --limit 8   # quick check of the script on CPU

Chips are real faces: skimage's public-domain astronaut under photometric and geometric
variants (mirror, brightness, gamma, noise, rotations, scales), aligned by facebatch's batched
warp on the same device. For each precision it prints the worst and median cosine similarity
to the fp32 descriptors (goal: worst >= 0.999) and descriptors/s of the network at each batch
size (input already on the device, as uint8 NHWC chips, as FaceEmbedder feeds it), plus
chips/s of the alignment. A time budget stops the sweep early rather than overrunning.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import benchlib

from facebatch.alignment import align_faces  # noqa: E402
from facebatch.embedder import FaceEmbedder  # noqa: E402

# MTCNN-style points of the astronaut's face (eye centres, nose tip, mouth corners).
ASTRONAUT_POINTS = np.array([[203.2, 101.5], [246.5, 104.2], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]])
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def face_variants(count: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` (image, landmarks) pairs: the astronaut transformed (and the points with it)."""
    import cv2
    from skimage import data

    astronaut = data.astronaut()
    rng = np.random.default_rng(seed)
    images, points = [], []
    for i in range(count):
        image = astronaut.astype(np.float32)
        image = image * rng.uniform(0.5, 1.3) + rng.uniform(-30, 30)
        image = 255 * (np.clip(image, 0, 255) / 255) ** rng.uniform(0.7, 1.5)
        image = np.clip(image + rng.normal(0, rng.uniform(0, 10), image.shape), 0, 255).astype(np.uint8)
        scale = rng.choice([0.5, 0.8, 1.0, 1.5, 2.5])
        angle = rng.uniform(-20, 20)
        matrix = cv2.getRotationMatrix2D((256.0, 256.0), angle, scale)
        size = int(512 * scale)
        matrix[:, 2] += (size - 512) / 2
        warped = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)
        landmarks = ASTRONAUT_POINTS @ matrix[:, :2].T + matrix[:, 2]
        if i % 2:
            warped = np.ascontiguousarray(warped[:, ::-1])
            landmarks = landmarks.copy()
            landmarks[:, 0] = size - 1 - landmarks[:, 0]
            landmarks = landmarks[[1, 0, 2, 4, 3]]  # mirrored: left and right swap
        images.append(warped)
        points.append(landmarks)
    return images, np.stack(points).astype(np.float32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=0, help="cap batch sizes and faces (CPU check)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop the sweep after this")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA not available; run with --device cpu --limit 8 to check the script")
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        torch.set_num_threads(2)
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")

    batch_sizes = [16, 64, 128, 256, 512, 1024]
    num_faces = 256
    if args.limit:
        batch_sizes = [b for b in [1, 2, 4, 8, 16, 32, 64] if b <= args.limit] or [args.limit]
        num_faces = args.limit
    images, landmarks = face_variants(num_faces)
    image_index = np.arange(num_faces)

    # Alignment on the device (includes moving the images there).
    align_faces(images[:4], image_index[:4], landmarks[:4], device=device)
    synchronize(device)
    start = time.perf_counter()
    chips = align_faces(images, image_index, landmarks, device=device)
    synchronize(device)
    align_s = time.perf_counter() - start
    print(f"align: {num_faces} faces from {num_faces} photos (64-1280 px) in {align_s * 1000:.0f} ms = {num_faces / align_s:.0f} chips/s")

    embedders = {name: FaceEmbedder(device=device, batch_size=max(batch_sizes), precision=name) for name in DTYPES}
    reference = embedders["fp32"].embed_chips(chips)
    print(f"{'precision':9} {'worst cos':>10} {'median cos':>10}")
    for name, embedder in embedders.items():
        if name != "fp32" and device.type != "cuda":
            # FaceEmbedder only autocasts on CUDA; on CPU check the autocast path directly.
            with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[name]):
                x = chips.permute(0, 3, 1, 2).float()
                try:
                    raw = embedder.network(x).float()
                except RuntimeError as error:  # some CPU builds lack fp16 kernels
                    print(f"{name:9} not supported on this CPU build: {error}")
                    continue
            vectors = torch.nn.functional.normalize(raw, dim=1).numpy()
        else:
            vectors = embedder.embed_chips(chips)
        cosine = (vectors * reference).sum(axis=1)
        print(f"{name:9} {cosine.min():10.6f} {np.median(cosine):10.6f}" + ("  (< 0.999!)" if cosine.min() < 0.999 else ""))

    print(f"{'precision':9} {'batch':>6} {'desc/s':>9} {'ms/batch':>9}")
    for name in DTYPES:
        if name != "fp32" and device.type != "cuda":
            continue
        network = embedders[name].network
        dtype = DTYPES[name]
        for batch in batch_sizes:
            if time.perf_counter() - started > args.budget_s:
                print("time budget reached; stopping the sweep")
                return
            reps = int(np.ceil(batch / len(chips)))
            inputs = chips.repeat(reps, 1, 1, 1)[:batch]
            x = inputs.permute(0, 3, 1, 2).float()

            def run():
                with torch.inference_mode():
                    if dtype is None:
                        network(x)
                    else:
                        with torch.autocast(device.type, dtype=dtype):
                            network(x)

            run()
            synchronize(device)
            iterations = 0
            start = time.perf_counter()
            while True:  # at least 3 runs and 1 s per point
                run()
                iterations += 1
                synchronize(device)
                elapsed = time.perf_counter() - start
                if iterations >= 3 and elapsed > 1.0:
                    break
            per_batch = elapsed / iterations
            print(f"{name:9} {batch:6d} {batch / per_batch:9.0f} {per_batch * 1000:9.1f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
