"""GPU end-to-end check for the device machine (fits in 8 minutes): `run_index` with one GPU actor.

Indexes a generated archive (and the shared corpus when ../shared is present) on a local Ray
instance with `--device cuda`, one inference actor holding the GPU and the remaining CPUs fetching
and decoding, and prints end-to-end images/s, the stage breakdown from the run record, and GPU
utilisation sampled with nvidia-smi every 0.5 s.

    python bench/gpu_pipeline.py --objects 3000 --batch-size 64
"""

from __future__ import annotations

import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib
from benchlib import REPO


class GpuSampler:
    def __init__(self, interval: float = 0.5):
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
                util, mem = (float(v) for v in out.split(","))
                self.util.append(util)
                self.mem.append(mem)
            except Exception:
                pass

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        busy = [u for u in self.util if u > 0] or [0.0]
        return {"mean_util_%": statistics.mean(self.util or [0.0]), "mean_util_when_busy_%": statistics.mean(busy),
                "peak_mem_MiB": max(self.mem or [0.0])}


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--objects", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-shared", action="store_true", help="leave out ../shared's detection photos")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from bench_scale import generated_photos
    from facebatch.config import IndexConfig
    from facebatch.pipeline import run_index

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch")
    work = Path(tempfile.mkdtemp(prefix="facebatch-gpu-"))
    archive = work / "archive"
    archive.mkdir()
    # Photo-sized inputs (1600x1200) so decode and transfer costs are realistic.
    for i, small in enumerate(generated_photos(min(200, args.objects))):
        img = Image.open(io.BytesIO(small)).resize((1600, 1200))
        img.save(archive / f"g{i:04d}.jpg", quality=90)
    files = sorted(archive.iterdir())
    for i in range(len(files), args.objects):
        (archive / f"c{i:06d}.jpg").symlink_to(files[i % len(files)])
    shared = REPO.parent / "shared" / "data" / "faces"
    if shared.is_dir() and not args.no_shared:
        shutil.copytree(shared / "detection", archive / "shared-detection")
    sampler = GpuSampler()
    t0 = time.perf_counter()
    summary = run_index(IndexConfig(source=str(archive), out=str(work / "tables"), device=args.device,
                                    batch_size=args.batch_size, num_actors=1).validate(), progress=False)
    wall = time.perf_counter() - t0
    gpu = sampler.stop()
    rec = summary.record
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; sizing {rec['sizing']}")
    print(f"images {rec['processed']}, faces {rec['faces']}, statuses {rec['images_by_status']}")
    print(f"processing {rec['seconds']['process']:.1f} s = {rec['images_per_second']:.1f} images/s; whole command {wall:.1f} s")
    print("stage seconds summed over workers: " + ", ".join(f"{k} {v:.1f}" for k, v in rec["seconds"].items() if k.endswith("_cpu_sum")))
    print(f"GPU: {gpu}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
