"""Scale run: tens of thousands of generated objects in a loopback S3 server, indexed end to end.

Shows that throughput stays flat and memory stays bounded from start to end: prints, every
`--every` seconds, images done, the images/s of that interval and the summed RSS of the driver
and the Ray workers (the S3 server's own memory is excluded: moto keeps every object in RAM).

Objects are small generated photos (320x240 JPEG, the astronaut's face pasted at a random place
and scale on a noisy background, a third with no face) so that a 2-core machine gets through
20,000 of them in reasonable time; their number, not their size, is what this run exercises:
listing, planning, the object store, the actor pool's streaming and the writer.

    .venv/bin/python bench/bench_scale.py --objects 20000
"""

from __future__ import annotations

import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import benchlib


def generated_photos(count: int, seed: int = 0) -> list[bytes]:
    from skimage import data

    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut()).crop((150, 30, 300, 200))
    photos = []
    for i in range(count):
        canvas = rng.normal(rng.uniform(60, 190), 20, size=(240, 320, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(canvas)
        if i % 3:
            side = int(rng.integers(40, 120))
            patch = face.resize((side, int(side * 170 / 150)))
            img.paste(patch, (int(rng.integers(0, 320 - side)), int(rng.integers(0, 240 - patch.height))))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        photos.append(buf.getvalue())
    return photos


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--distinct", type=int, default=300, help="distinct generated photos, reused under many keys")
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="facebatch-bench-scale-"))
    with benchlib.s3_server(work, "scale") as server:
        run(args, server)


def run(args, server) -> None:
    from bench_pipeline import MemorySampler

    from facebatch.config import IndexConfig
    from facebatch.pipeline import run_index

    client = server.client()
    photos = generated_photos(args.distinct)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="scale", Key=f"photos/{i % 100:02d}/{i:07d}.jpg", Body=photos[i % len(photos)]),
                      range(args.objects)))
    print(f"uploaded {args.objects} objects in {time.perf_counter() - t0:.0f} s")

    sampler = MemorySampler(interval=1.0, exclude_pids=(server.process.pid,))
    timeline: list[tuple[float, int, int, float]] = []
    last = [0.0]

    def on_batch(done: int, faces: int, elapsed: float) -> None:
        if elapsed - last[0] >= args.every or done == args.objects:
            timeline.append((elapsed, done, faces, sampler.rss_mb()))
            last[0] = elapsed

    summary = run_index(IndexConfig(source="s3://scale/photos", out="s3://scale/index", batch_size=args.batch_size).validate(),
                        object_store_memory=300 * 2**20, progress=False, on_batch=on_batch)
    peak = sampler.stop()
    print(f"{'seconds':>8s} {'images':>8s} {'faces':>8s} {'images/s (interval)':>20s} {'RSS MiB':>8s}")
    prev_t, prev_n = 0.0, 0
    for t, n, f, rss in timeline:
        rate = (n - prev_n) / max(1e-9, t - prev_t)
        print(f"{t:8.0f} {n:8d} {f:8d} {rate:20.1f} {rss:8.0f}")
        prev_t, prev_n = t, n
    rec = summary.record
    print(f"total: {rec['processed']} images in {rec['seconds']['process']:.0f} s = {rec['images_per_second']:.1f} images/s; "
          f"plan {rec['seconds']['plan']:.1f} s; statuses {rec['images_by_status']}; faces {rec['faces']}; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
